//! Kafka in, against Apache Kafka (tests/it/support/kafka.rs): exactly once across kill -9, dead
//! letters on a topic, a broker restart and crash, two and three instances in one group with
//! scale-in by kill -9 under each rebalance protocol (eager, cooperative-sticky, KIP-848),
//! a three-node cluster losing a partition leader under load, topics compressed with each
//! codec, and each member of a group holding the anomaly models of its partitions' keys
//! only (warmed up from ClickHouse at assignment, dropped at revocation; eager and
//! cooperative).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::kafka::{end_offsets, messages_in, unique, Broker, Cluster};
use crate::support::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;

/// The group-protocol properties most tests use: a killed instance leaves the group after
/// the session timeout, not the default 45 s.
const CLASSIC: &str = "\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n";

fn kafka_config(
    dir: &Path,
    state: &Path,
    brokers: &str,
    topic: &str,
    group: &str,
    extra: &str,
) -> std::path::PathBuf {
    kafka_config_with(dir, state, brokers, topic, group, extra, CLASSIC)
}

fn kafka_config_with(
    dir: &Path,
    state: &Path,
    brokers: &str,
    topic: &str,
    group: &str,
    extra: &str,
    properties: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{group}.toml"));
    std::fs::write(
        &path,
        format!(
            "state_dir = {state:?}\n\
             [input]\nkind = \"kafka\"\nformat = \"nginx\"\n\
             [input.kafka]\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{group}\"\n\
             {extra}\n\
             [input.kafka.properties]\n{properties}\
             [fingerprint]\nsecret_env = \"KW_TEST_SECRET\"\n\
             [pipeline]\nbatch_max_events = 500\nbatch_max_wait = \"100ms\"\n\
             [server]\nenabled = false\n"
        ),
    )
    .unwrap();
    path
}

fn produce(brokers: &str, topic: &str, file: &Path) {
    run_ok(
        keywatch()
            .args(["produce", "--brokers", brokers, "--topic", topic, "--file"])
            .arg(file)
            .env("KW_TEST_SECRET", SECRET),
    );
}

/// Waits until the store holds `want` events (or fails after `timeout`).
fn wait_for_total(state: &Path, want: u64, timeout: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let got = try_totals(state).map_or(0, |(t, _)| t);
        if got >= want || start.elapsed() > timeout {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sigterm(child: &mut std::process::Child) {
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = wait_with_timeout(child, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
}

#[test]
fn exactly_once_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let topic = unique("events");
    broker.create_topic(&topic, 3);
    let n = 40_000;
    let log = sample(dir.path(), "nginx", n, 21);
    produce(&broker.brokers(), &topic, &log);

    let state = dir.path().join("state");
    let cfg = kafka_config(
        dir.path(),
        &state,
        &broker.brokers(),
        &topic,
        &unique("g"),
        "",
    );
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut progress = Vec::new();
    for _ in 0..4 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let before = try_totals(&state).map_or(0, |(t, _)| t);
        if before >= n as u64 {
            break;
        }
        let mut child = spawn_quiet(&mut run_config(&cfg));
        // Let this instance join the group and store something, then kill it at a random
        // moment.
        wait_for_total(&state, before + 1, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(rng % 300));
        child.kill().unwrap();
        child.wait().unwrap();
        progress.push(totals(&state).0);
    }
    let mut child = spawn_quiet(&mut run_config(&cfg));
    let got = wait_for_total(&state, n as u64, Duration::from_secs(240));
    // Nothing more may arrive: give a duplicate the time to show up.
    std::thread::sleep(Duration::from_secs(2));
    sigterm(&mut child);
    eprintln!("kills at {progress:?}, final {got}");
    assert!(
        progress.iter().any(|p| *p < n as u64),
        "a kill must land mid-stream: {progress:?}"
    );
    assert_eq!(totals(&state), (n as u64, n as u64));
}

#[test]
fn undecodable_messages_go_to_the_dead_letter_topic() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let topic = unique("events");
    let dlq = unique("dead");
    broker.create_topic(&topic, 2);
    broker.create_topic(&dlq, 1);
    let log = sample(dir.path(), "nginx", 300, 4);
    let raw_keys = json_field_values(&log, "http_x_api_key");
    let mut lines = lines_of(&log);
    lines.insert(10, "not json at all".into());
    lines.insert(
        20,
        format!("{{\"http_x_api_key\":\"{}\",\"status\":", raw_keys[0]),
    );
    lines.insert(
        30,
        "{\"status\":\"200\",\"remote_addr\":\"10.9.9.9\"}".into(),
    );
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    produce(&broker.brokers(), &topic, &log);

    let state = dir.path().join("state");
    let cfg = kafka_config(
        dir.path(),
        &state,
        &broker.brokers(),
        &topic,
        &unique("g"),
        &format!("dead_letter_topic = \"{dlq}\""),
    );
    let mut child = spawn_quiet(&mut run_config(&cfg));
    assert_eq!(wait_for_total(&state, 300, Duration::from_secs(60)), 300);
    sigterm(&mut child);
    assert_eq!(totals(&state), (300, 300));

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    let mut records = Vec::new();
    let start = Instant::now();
    while records.len() < 3 && start.elapsed() < Duration::from_secs(30) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers = m.headers().expect("dead letters carry headers");
            let header = |name: &str| {
                headers
                    .iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            records.push((
                String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                header("keywatch.reason"),
                header("keywatch.topic"),
            ));
        }
    }
    assert_eq!(records.len(), 3, "{records:?}");
    assert!(records.iter().all(|(_, _, t)| *t == topic));
    // Messages from two partitions: their dead letters may come in any order.
    assert!(
        records
            .iter()
            .any(|(_, r, _)| r.starts_with("not valid JSON")),
        "{records:?}"
    );
    assert!(
        records.iter().any(|(_, r, _)| r.contains("missing field")),
        "{records:?}"
    );
    for (payload, _, _) in &records {
        for k in &raw_keys {
            assert!(!payload.contains(k.as_str()), "raw key in a dead letter");
        }
    }
    assert!(records.iter().any(|(p, _, _)| p.contains("fp:")));
}

#[test]
fn survives_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker_dir = dir.path().join("broker");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let mut broker = Broker::start(&broker_dir);
    let topic = unique("events");
    broker.create_topic(&topic, 2);
    let first = sample(dir.path(), "nginx", 3000, 8);
    produce(&broker.brokers(), &topic, &first);

    let state = dir.path().join("state");
    let cfg = kafka_config(
        dir.path(),
        &state,
        &broker.brokers(),
        &topic,
        &unique("g"),
        "",
    );
    let mut child = spawn_quiet(&mut run_config(&cfg));
    assert_eq!(wait_for_total(&state, 3000, Duration::from_secs(60)), 3000);

    broker.restart();
    let second = sample(dir.path(), "nginx", 2000, 9);
    produce(&broker.brokers(), &topic, &second);
    assert_eq!(wait_for_total(&state, 5000, Duration::from_secs(90)), 5000);

    // A crash (kill -9): the broker recovers its logs and keywatch carries on.
    broker.crash_and_restart();
    let third_dir = dir.path().join("third");
    std::fs::create_dir_all(&third_dir).unwrap();
    let third = sample(&third_dir, "nginx", 2000, 10);
    produce(&broker.brokers(), &topic, &third);
    let got = wait_for_total(&state, 7000, Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(1));
    sigterm(&mut child);
    assert_eq!(got, 7000);
    assert_eq!(totals(&state), (7000, 7000));
}

/// `instances` keywatch processes in one group, sharing one store (SQLite on one host;
/// ClickHouse across hosts: offsets live with the data, so a partition moving between
/// instances resumes where it was stored). Once all have joined, all but one are killed with
/// kill -9, one at a time: the group notices only when the session times out, and the
/// survivor takes their partitions over from the store.
fn scale_in_by_kill_9(instances: usize, properties: &str) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let topic = unique("events");
    broker.create_topic(&topic, 6);
    let n = 30_000;
    let log = sample(dir.path(), "nginx", n, 12);
    // Produced in 30 slices over about 15 s, so that the joins and the kills all land while
    // events are still arriving.
    let slices: Vec<std::path::PathBuf> = lines_of(&log)
        .chunks(n / 30)
        .enumerate()
        .map(|(i, chunk)| {
            let path = dir.path().join(format!("slice-{i}.log"));
            std::fs::write(&path, chunk.join("\n") + "\n").unwrap();
            path
        })
        .collect();
    let producer = {
        let (brokers, topic) = (broker.brokers(), topic.clone());
        std::thread::spawn(move || {
            for slice in slices {
                produce(&brokers, &topic, &slice);
                std::thread::sleep(Duration::from_millis(400));
            }
        })
    };

    let state = dir.path().join("state");
    let group = unique("g");
    let cfg = kafka_config_with(
        dir.path(),
        &state,
        &broker.brokers(),
        &topic,
        &group,
        "",
        properties,
    );
    let mut members: Vec<Running> = Vec::new();
    let mut seen = Vec::new();
    for _ in 0..instances {
        let before = try_totals(&state).map_or(0, |(t, _)| t);
        members.push(Running(spawn_quiet(&mut run_config(&cfg))));
        // Each joins (a rebalance) while the others are storing.
        wait_for_total(&state, before + 1, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1500));
    }
    while members.len() > 1 {
        let mut victim = members.remove(0);
        victim.0.kill().unwrap();
        victim.0.wait().unwrap();
        seen.push(try_totals(&state).map_or(0, |(t, _)| t));
        std::thread::sleep(Duration::from_millis(500));
    }
    producer.join().unwrap();
    let got = wait_for_total(&state, n as u64, Duration::from_secs(180));
    // Nothing more may arrive: give a duplicate the time to show up.
    std::thread::sleep(Duration::from_secs(2));
    let mut last = members.pop().unwrap();
    sigterm(&mut last.0);
    eprintln!("events stored at each kill: {seen:?}; final {got}");
    assert!(
        seen.iter().any(|s| *s < n as u64),
        "the kills must land mid-stream: {seen:?}"
    );
    // Where each partition stands, against what the broker holds: a partition short of its
    // end stalled; one at its end with events missing skipped them.
    use keywatch::store::Store;
    let stored = keywatch::store::SqliteStore::open_read_only(&state)
        .unwrap()
        .position(&format!("kafka:{group}"))
        .unwrap();
    assert_eq!(
        totals(&state),
        (n as u64, n as u64),
        "stored positions {stored:?}; the broker holds {:?}",
        end_offsets(&broker.brokers(), &topic)
    );
}

#[test]
fn two_instances_scale_in_by_kill_9_exactly_once() {
    scale_in_by_kill_9(2, CLASSIC);
}

#[test]
fn three_instances_cooperative_sticky_scale_in_by_kill_9_exactly_once() {
    scale_in_by_kill_9(
        3,
        &format!("{CLASSIC}\"partition.assignment.strategy\" = \"cooperative-sticky\"\n"),
    );
}

/// KIP-848: the broker assigns partitions, incrementally (librdkafka 2.12 against Kafka 4).
/// The session timeout is the broker's (`group.consumer.session.timeout.ms`, 6 s in the
/// test broker); the client may not set it.
#[test]
fn three_instances_kip848_consumer_protocol_scale_in_by_kill_9_exactly_once() {
    scale_in_by_kill_9(3, "\"group.protocol\" = \"consumer\"\n");
}

/// A three-node cluster (replication 3, two in-sync replicas needed for a write) loses the
/// leader of a partition while events are produced and stored: nothing lost, nothing
/// counted twice; the node comes back and the run ends with everything stored once.
#[test]
fn cluster_losing_a_partition_leader_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), 3);
    let topic = unique("events");
    cluster.create_topic(&topic, 4);
    let n = 40_000;
    let first = sample(dir.path(), "nginx", n / 2, 51);
    let second_dir = dir.path().join("second");
    std::fs::create_dir_all(&second_dir).unwrap();
    let second = sample(&second_dir, "nginx", n / 2, 52);
    produce(&cluster.brokers(), &topic, &first);

    let state = dir.path().join("state");
    let cfg = kafka_config(
        dir.path(),
        &state,
        &cluster.brokers(),
        &topic,
        &unique("g"),
        "",
    );
    let mut child = Running(spawn_quiet(&mut run_config(&cfg)));
    wait_for_total(&state, 1, Duration::from_secs(60));
    // Under load: the second half is produced (acks=all, idempotent) while the leader of
    // partition 0 dies.
    let producer = {
        let (brokers, topic) = (cluster.brokers(), topic.clone());
        std::thread::spawn(move || produce(&brokers, &topic, &second))
    };
    std::thread::sleep(Duration::from_millis(300));
    let leader = cluster.leader_of(&topic, 0);
    let stored_at_kill = try_totals(&state).map_or(0, |(t, _)| t);
    cluster.kill(leader);
    producer.join().expect("producing through the failover");
    let new_leader = cluster.leader_of(&topic, 0);
    assert_ne!(new_leader, leader, "partition 0 has a new leader");
    let got = wait_for_total(&state, n as u64, Duration::from_secs(180));
    cluster.restart(leader);
    std::thread::sleep(Duration::from_secs(3));
    sigterm(&mut child.0);
    eprintln!(
        "node {leader} killed with {stored_at_kill} events stored; {new_leader} took over; final {got}"
    );
    assert!(stored_at_kill < n as u64, "the kill must land mid-stream");
    assert_eq!(messages_in(&cluster.brokers(), &topic), n as i64);
    assert_eq!(totals(&state), (n as u64, n as u64));
}

/// A topic stored compressed with each codec Kafka offers (the broker recompresses whatever
/// the producer sent, `compression.type` on the topic) is read whole.
#[test]
fn compressed_topics_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    for (i, codec) in ["gzip", "snappy", "lz4", "zstd"].into_iter().enumerate() {
        let topic = unique(codec);
        broker.create_compressed_topic(&topic, 2, codec);
        let sub = dir.path().join(codec);
        std::fs::create_dir_all(&sub).unwrap();
        let n = 3000;
        let log = sample(&sub, "nginx", n, 60 + i as u64);
        produce(&broker.brokers(), &topic, &log);
        let state = sub.join("state");
        let cfg = kafka_config(&sub, &state, &broker.brokers(), &topic, &unique("g"), "");
        let mut child = Running(spawn_quiet(&mut run_config(&cfg)));
        let got = wait_for_total(&state, n as u64, Duration::from_secs(60));
        sigterm(&mut child.0);
        assert_eq!(got, n as u64, "{codec}");
        assert_eq!(totals(&state), (n as u64, n as u64), "{codec}");
    }
}

/// kcat (Debian's kafkacat, librdkafka 2.0) produces a log, zstd-compressed, one message
/// per line, as README.md shows; keywatch reads it whole.
#[test]
fn kcat_produces_test_data() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let topic = unique("events");
    broker.create_topic(&topic, 2);
    let n = 2000;
    let log = sample(dir.path(), "nginx", n, 70);
    let kcat = ["kcat", "kafkacat"]
        .into_iter()
        .find(|k| {
            std::process::Command::new(k)
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("kcat (Debian's kafkacat; scripts/test.sh installs it)");
    let status = std::process::Command::new(kcat)
        .args(["-P", "-b", &broker.brokers(), "-t", &topic, "-z", "zstd"])
        .stdin(std::fs::File::open(&log).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(messages_in(&broker.brokers(), &topic), n as i64);
    let state = dir.path().join("state");
    let cfg = kafka_config(
        dir.path(),
        &state,
        &broker.brokers(),
        &topic,
        &unique("g"),
        "",
    );
    let mut child = Running(spawn_quiet(&mut run_config(&cfg)));
    let got = wait_for_total(&state, n as u64, Duration::from_secs(60));
    sigterm(&mut child.0);
    assert_eq!(got, n as u64);
    assert_eq!(totals(&state), (n as u64, n as u64));
}

/// Kafka in, ClickHouse (the real 18.16 server) as the store.
fn clickhouse_config(
    dir: &Path,
    brokers: &str,
    topic: &str,
    group: &str,
    ch_url: &str,
    db: &str,
) -> std::path::PathBuf {
    let path = kafka_config(dir, &dir.join("state"), brokers, topic, group, "");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "[store]\nkind = \"clickhouse\"\n[store.clickhouse]\nurl = \"{ch_url}\"\ndatabase = \"{db}\"\ninsert_timeout = \"5s\"\nretention_days = 0\n"
    ));
    std::fs::write(&path, text).unwrap();
    path
}

fn wait_for_clickhouse(
    ch: &crate::support::clickhouse::ClickHouse,
    db: &str,
    want: u64,
    timeout: Duration,
) -> u64 {
    let start = Instant::now();
    loop {
        let got = ch.totals(db).map_or(0, |(r, _)| r);
        if got >= want || start.elapsed() > timeout {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn kafka_to_clickhouse_exactly_once_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let ch = crate::support::clickhouse::ClickHouse::shared_or_start(&dir.path().join("ch"));
    let broker = Broker::start(dir.path());
    let topic = unique("events");
    broker.create_topic(&topic, 3);
    let n = 30_000;
    let log = sample(dir.path(), "nginx", n, 31);
    produce(&broker.brokers(), &topic, &log);
    let db = unique("kw").replace('-', "_");
    let cfg = clickhouse_config(
        dir.path(),
        &broker.brokers(),
        &topic,
        &unique("g"),
        &ch.url,
        &db,
    );

    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut progress = Vec::new();
    for _ in 0..4 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let before = ch.totals(&db).map_or(0, |(r, _)| r);
        if before >= n as u64 {
            break;
        }
        let mut child = spawn_quiet(&mut run_config(&cfg));
        wait_for_clickhouse(&ch, &db, before + 1, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(rng % 400));
        child.kill().unwrap();
        child.wait().unwrap();
        progress.push(ch.totals(&db));
    }
    let mut child = spawn_quiet(&mut run_config(&cfg));
    let got = wait_for_clickhouse(&ch, &db, n as u64, Duration::from_secs(240));
    std::thread::sleep(Duration::from_secs(2));
    sigterm(&mut child);
    eprintln!("after each kill (rollups, raw rows): {progress:?}; final {got}");
    assert!(progress.len() >= 2, "{progress:?}");
    assert_eq!(ch.totals(&db), Some((n as u64, n as u64)));
}

/// What the store-outage tests share: a private ClickHouse (they stop and restart it), a
/// broker with a topic of `partitions`, and a config writing into database `db` with
/// `max.poll.interval.ms` at 6 s, so that a member not polling is put out of the group
/// within the test, and one rotation evaluation an hour: evaluation is not what these tests
/// are about, and a periodic evaluation that cannot store its findings stops the daemon
/// (see the report of issue 12).
struct OutageRig {
    // Declared before `dir`, so that they stop before their directories go.
    ch: crate::support::clickhouse::ClickHouse,
    broker: Broker,
    topic: String,
    db: &'static str,
    cfg: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl OutageRig {
    fn new(partitions: i32, db: &'static str) -> OutageRig {
        let dir = tempfile::tempdir().unwrap();
        let ch = crate::support::clickhouse::ClickHouse::start(&dir.path().join("ch"));
        let broker = Broker::start(dir.path());
        let topic = unique("events");
        broker.create_topic(&topic, partitions);
        let cfg = clickhouse_config(
            dir.path(),
            &broker.brokers(),
            &topic,
            &unique("g"),
            &ch.url,
            db,
        );
        let rig = OutageRig {
            ch,
            broker,
            topic,
            db,
            cfg,
            dir,
        };
        rig.edit_config(&[
            (
                "[input.kafka.properties]\n",
                "[input.kafka.properties]\n\"max.poll.interval.ms\" = \"6000\"\n",
            ),
            (
                "[fingerprint]",
                "[rules]\nevaluate_every = \"1h\"\n[fingerprint]",
            ),
        ]);
        rig
    }

    fn edit_config(&self, replacements: &[(&str, &str)]) {
        let mut text = std::fs::read_to_string(&self.cfg).unwrap();
        for (from, to) in replacements {
            assert!(text.contains(from), "{from:?} not in the config:\n{text}");
            text = text.replace(from, to);
        }
        std::fs::write(&self.cfg, text).unwrap();
    }

    /// Produces `n` sample lines (seed `seed`).
    fn produce(&self, n: usize, seed: u64) {
        let log = sample(self.dir.path(), "nginx", n, seed);
        produce(&self.broker.brokers(), &self.topic, &log);
    }

    fn stored(&self, want: u64, timeout: Duration) -> u64 {
        wait_for_clickhouse(&self.ch, self.db, want, timeout)
    }

    /// A keywatch run on the config, its stderr in `log`.
    fn spawn(&self, log: &Path) -> Running {
        Running(
            run_config(&self.cfg)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(log).unwrap())
                .spawn()
                .unwrap(),
        )
    }
}

#[test]
fn clickhouse_down_for_a_while_loses_nothing() {
    let rig = OutageRig::new(2, "kw_outage");
    rig.produce(5000, 41);
    let mut child = spawn_quiet(&mut run_config(&rig.cfg));
    assert_eq!(rig.stored(5000, Duration::from_secs(60)), 5000);

    // The store goes away while more traffic arrives; keywatch retries and waits.
    rig.ch.stop();
    rig.produce(5000, 42);
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        child.try_wait().unwrap().is_none(),
        "keywatch must survive the outage"
    );
    rig.ch.restart_after_stop();
    let got = rig.stored(10_000, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    sigterm(&mut child);
    assert_eq!(got, 10_000);
    assert_eq!(rig.ch.totals(rig.db), Some((10_000, 10_000)));
}

/// The store is down when a rebalance asks it where partitions start: the rebalance
/// callback gives up after its share of `max.poll.interval.ms` (6 s here), the partitions
/// wait paused, and they start from the stored offsets once the store is back; the member
/// outlives two poll intervals meanwhile, and nothing is lost or counted twice.
#[test]
fn store_down_during_a_rebalance_defers_the_start_past_max_poll_interval() {
    let rig = OutageRig::new(4, "kw_deferred");
    rig.produce(4000, 43);
    let logs: Vec<std::path::PathBuf> = ["a", "b"]
        .iter()
        .map(|n| rig.dir.path().join(format!("{n}.log")))
        .collect();
    let start = |log: &Path| rig.spawn(log);
    let mut a = start(&logs[0]);
    let mut b = start(&logs[1]);
    assert_eq!(rig.stored(4000, Duration::from_secs(60)), 4000);
    std::thread::sleep(Duration::from_secs(2));

    // The store goes away (keywatch does not start without it, so both members were up
    // before); one member leaves (a rebalance: the other is assigned every partition) and
    // more traffic arrives.
    rig.ch.stop();
    sigterm(&mut b.0);
    rig.produce(4000, 44);
    std::thread::sleep(Duration::from_secs(12));
    if let Some(status) = a.0.try_wait().unwrap() {
        panic!(
            "the member exited ({status}):\n{}",
            std::fs::read_to_string(&logs[0]).unwrap()
        );
    }
    rig.ch.restart_after_stop();
    let got = rig.stored(8000, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    sigterm(&mut a.0);
    let log: String = logs
        .iter()
        .map(|l| std::fs::read_to_string(l).unwrap())
        .collect();
    assert!(
        log.contains("the partitions wait, paused")
            && log.contains("partition started after the store recovered"),
        "the deferred start was not exercised (got {got}):\n{}",
        log.lines()
            .filter(|l| l.contains("source::kafka"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(got, 8000);
    assert_eq!(rig.ch.totals(rig.db), Some((8000, 8000)));
}

/// The store is down for more than two poll intervals while traffic keeps coming: the
/// pipeline fills up, and the member pauses its partitions and goes on polling instead of
/// waiting on the pipeline, so librdkafka never puts it out of the group (no poll-interval
/// expiry, no rebalance); once the store is back everything is stored, once.
#[test]
fn a_full_pipeline_pauses_the_partitions_and_the_member_stays_in_the_group() {
    let rig = OutageRig::new(2, "kw_backpressure");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    rig.edit_config(&[
        (
            "[pipeline]\nbatch_max_events = 500\n",
            "[pipeline]\nbatch_max_events = 100\nchannel_capacity = 1\n",
        ),
        (
            "[server]\nenabled = false\n",
            &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
        ),
    ]);
    let log = rig.dir.path().join("keywatch.log");
    let mut member = rig.spawn(&log);
    rig.produce(1000, 45);
    let got = rig.stored(1000, Duration::from_secs(60));
    assert_eq!(got, 1000, "{}", std::fs::read_to_string(&log).unwrap());

    rig.ch.stop();
    rig.produce(5000, 46);
    std::thread::sleep(Duration::from_secs(15));
    if let Some(status) = member.0.try_wait().unwrap() {
        panic!(
            "the member exited ({status}):\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
    }
    let pauses = metric(port, "keywatch_kafka_backpressure_pauses_total");
    let rebalances = metric(port, "keywatch_kafka_rebalances_total");
    rig.ch.restart_after_stop();
    let got = rig.stored(6000, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    sigterm(&mut member.0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("max.poll.interval.ms) exceeded"),
        "the member stopped polling while the store was down:\n{text}"
    );
    assert!(
        pauses.is_some_and(|p| p >= 1.0),
        "the pipeline never filled up (pauses {pauses:?}), so this tested nothing"
    );
    // The first assignment is the only rebalance.
    assert_eq!(rebalances, Some(1.0), "{text}");
    assert_eq!(got, 6000);
    assert_eq!(rig.ch.totals(rig.db), Some((6000, 6000)));
}

#[test]
fn check_config_connect_says_what_works_and_what_fails() {
    let dir = tempfile::tempdir().unwrap();
    let ch = crate::support::clickhouse::ClickHouse::shared_or_start(&dir.path().join("ch"));
    let broker = Broker::start(dir.path());
    let topic = unique("events");
    broker.create_topic(&topic, 1);
    let cfg = clickhouse_config(
        dir.path(),
        &broker.brokers(),
        &topic,
        "g",
        &ch.url,
        "kw_connect",
    );
    let out = keywatch()
        .arg("check-config")
        .arg(&cfg)
        .arg("--connect")
        .env("KW_TEST_SECRET", SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("topics {topic} (1 partitions)")),
        "{stdout}"
    );
    assert!(
        stdout.contains("clickhouse") && stdout.contains(": ok: ClickHouse"),
        "{stdout}"
    );

    // A lifecycle topic that does not exist (yet): exit 3, said plainly.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "[fingerprint]",
            "[rules.lifecycle]\ntopic = \"no-such-lifecycle\"\n[fingerprint]",
        ),
    )
    .unwrap();
    let out = keywatch()
        .arg("check-config")
        .arg(&cfg)
        .arg("--connect")
        .env("KW_TEST_SECRET", SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("lifecycle topic on")
            && stdout.contains("FAILED: topic no-such-lifecycle does not exist"),
        "{stdout}"
    );
    std::fs::write(&cfg, text).unwrap();

    // A missing topic and an unreachable ClickHouse: exit 3, each said plainly.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&topic, "no-such-topic")
        .replace(&ch.url, "http://127.0.0.1:1");
    std::fs::write(&cfg, text).unwrap();
    let out = keywatch()
        .arg("check-config")
        .arg(&cfg)
        .arg("--connect")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("FAILED: topic no-such-topic does not exist"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAILED: cannot reach the server"),
        "{stdout}"
    );
}

/// Members of a group share the store: exactly one of them (the owner of partition 0)
/// evaluates rotations, so reminders are not sent once per instance; when it leaves, the
/// member that gets partition 0 takes over.
#[test]
fn one_member_of_a_group_evaluates_rotations_and_another_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let topic = unique("events");
    broker.create_topic(&topic, 4);
    let log = sample(dir.path(), "nginx", 2000, 7);
    produce(&broker.brokers(), &topic, &log);
    let state = dir.path().join("state");
    let group = unique("g");
    let config_on = |name: &str, port: u16| {
        let cfg = kafka_config(dir.path(), &state, &broker.brokers(), &topic, &group, "");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(
                "[server]\nenabled = false\n",
                &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
            )
            .replace(
                "[fingerprint]",
                "[rules]\nevaluate_every = \"200ms\"\n[fingerprint]",
            );
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let (pa, pb) = (free_port(), free_port());
    let evaluator = |port| metric(port, "keywatch_rotation_evaluator");
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    let a = Running(spawn_quiet(&mut run_config(&config_on("a", pa))));
    wait("a alone evaluates", &|| evaluator(pa) == Some(1.0));
    let b = Running(spawn_quiet(&mut run_config(&config_on("b", pb))));
    // Never two evaluators (none for a moment during a rebalance); one once it settles.
    wait("b is up", &|| evaluator(pb).is_some());
    let start = Instant::now();
    let mut settled = 0;
    while settled < 10 {
        assert!(start.elapsed() < Duration::from_secs(60), "no evaluator");
        let (x, y) = (evaluator(pa).unwrap(), evaluator(pb).unwrap());
        assert!(x + y <= 1.0, "two evaluators: a={x} b={y}");
        settled = if x + y == 1.0 { settled + 1 } else { 0 };
        std::thread::sleep(Duration::from_millis(200));
    }
    // The evaluator leaves: the other takes over.
    let (mut leader, other_port, mut other) = if evaluator(pa) == Some(1.0) {
        (a, pb, b)
    } else {
        (b, pa, a)
    };
    sigterm(&mut leader.0);
    wait("the other takes over", &|| {
        evaluator(other_port) == Some(1.0)
    });
    sigterm(&mut other.0);
}

/// A daemon killed if the test fails before stopping it (no orphan keeps running).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 13 item 4: each member of a group holds the anomaly models of its partitions' keys
/// only. Messages are keyed by key id (`keywatch produce`), so each key's events are on
/// one partition. A member alone holds every key; a second member joining warms up, from
/// ClickHouse, only the keys of the partition it is given, while the first drops them; when
/// the first leaves, the second warms up the rest. No traffic arrives after the first
/// member stored everything, so what the second holds came from the warm-ups.
#[test]
fn each_member_holds_the_anomaly_models_of_its_partitions_keys() {
    members_hold_their_partitions_keys("");
}

/// The same under the cooperative protocol: a revocation is not followed by an assignment
/// to the member that loses the partition.
#[test]
fn each_member_holds_its_partitions_keys_cooperative_sticky() {
    members_hold_their_partitions_keys(
        "\"partition.assignment.strategy\" = \"cooperative-sticky\"\n",
    );
}

/// The same under the consumer protocol of KIP-848: the broker assigns, one partition at a
/// time, with no group-wide rebalance.
#[test]
fn each_member_holds_its_partitions_keys_kip848_consumer_protocol() {
    members_hold_their_partitions_keys("\"group.protocol\" = \"consumer\"\n");
}

/// `properties` go into `[input.kafka.properties]`; with `group.protocol = consumer` in
/// place of the classic session settings, which that protocol refuses (the broker owns
/// them).
fn members_hold_their_partitions_keys(properties: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ch = crate::support::clickhouse::ClickHouse::shared_or_start(&dir.path().join("ch"));
    let broker = Broker::start(dir.path());
    let topic = unique("events");
    broker.create_topic(&topic, 2);
    let n = 3000;
    let log = sample(dir.path(), "nginx", n, 41);
    let db = unique("kw").replace('-', "_");
    let group = unique("g");
    let config_on = |name: &str, port: u16| {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let cfg = clickhouse_config(&sub, &broker.brokers(), &topic, &group, &ch.url, &db);
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(
                "[server]\nenabled = false\n",
                &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
            )
            .replace(
                "[input.kafka.properties]\n",
                &format!("[input.kafka.properties]\n{properties}"),
            );
        let text = if properties.contains("\"group.protocol\" = \"consumer\"") {
            text.replace(CLASSIC, "")
        } else {
            text
        };
        std::fs::write(&cfg, text).unwrap();
        cfg
    };
    let keys = |port| metric(port, "keywatch_anomaly_keys");
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    let (pa, pb) = (free_port(), free_port());
    let config_a = config_on("a", pa);
    // Decoded with the members' format and secret, so that each message is keyed by its key
    // id (without a config, `produce` decodes Kong and sends nginx lines unkeyed).
    run_ok(
        keywatch()
            .args([
                "produce",
                "--brokers",
                &broker.brokers(),
                "--topic",
                &topic,
                "--file",
            ])
            .arg(&log)
            .arg("--config")
            .arg(&config_a)
            .env("KW_TEST_SECRET", SECRET),
    );
    let mut a = Running(spawn_quiet(&mut run_config(&config_a)));
    assert_eq!(
        wait_for_clickhouse(&ch, &db, n as u64, Duration::from_secs(120)),
        n as u64
    );
    wait("a holds keys", &|| keys(pa).is_some_and(|k| k > 0.0));
    let all = keys(pa).unwrap();

    let mut b = Running(spawn_quiet(&mut run_config(&config_on("b", pb))));
    // Settled: both hold some keys, and together every key once (the two members hold one
    // partition each).
    let split = || match (keys(pa), keys(pb)) {
        (Some(x), Some(y)) => x > 0.0 && y > 0.0 && x + y == all,
        _ => false,
    };
    wait("the keys split between the members", &split);
    let (ka, kb) = (keys(pa).unwrap(), keys(pb).unwrap());
    assert!(ka < all && kb < all, "a={ka} b={kb} of {all}");
    // Nothing new was consumed: the store still holds exactly the log.
    assert_eq!(ch.totals(&db), Some((n as u64, n as u64)));

    // A leaves: B is given A's partition and warms up its keys.
    sigterm(&mut a.0);
    wait("b holds every key", &|| keys(pb) == Some(all));
    sigterm(&mut b.0);
    assert_eq!(ch.totals(&db), Some((n as u64, n as u64)));
    eprintln!("keys: {all} alone; {ka} + {kb} when split");
}

/// `keywatch produce` succeeds only once the broker has acknowledged every message: with
/// the broker gone, librdkafka gives up on them (`message.timeout.ms`) and the command
/// fails saying how many were lost.
#[test]
fn produce_fails_when_the_broker_does_not_acknowledge() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let topic = unique("produced");
    broker.create_topic(&topic, 2);
    let log = sample(dir.path(), "kong", 200, 3);
    let produce = |brokers: &str| {
        keywatch()
            .args(["produce", "--brokers", brokers, "--topic", &topic, "--file"])
            .arg(&log)
            .args(["-X", "message.timeout.ms=3000"])
            .env("KW_TEST_SECRET", SECRET)
            .output()
            .unwrap()
    };
    let out = produce(&broker.brokers());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("sent 200 message(s)"), "{stderr}");
    assert_eq!(messages_in(&broker.brokers(), &topic), 200);

    let brokers = broker.brokers();
    broker.stop();
    let out = produce(&brokers);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "200 of 200 messages to {topic} were not delivered"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("timed out"), "{stderr}");
}

/// A cooperative rebalance drops the batch a member was filling; the partitions it keeps are
/// sought back to where that batch began. Also a partition whose first messages ever were
/// in that batch (nothing of it stored or cut yet): it was not sought back, and those
/// messages were skipped for good.
#[test]
fn a_partition_first_read_in_a_batch_dropped_at_a_cooperative_rebalance_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let topic = unique("events");
    broker.create_topic(&topic, 2);
    let n = 2000u64;
    let log = sample(dir.path(), "nginx", n as usize, 21);
    produce(&broker.brokers(), &topic, &log);
    let ends = end_offsets(&broker.brokers(), &topic);
    assert!(ends.iter().all(|(_, end)| *end > 0), "{ends:?}");
    let state = dir.path().join("state");
    let group = unique("g");
    let cfg = kafka_config_with(
        dir.path(),
        &state,
        &broker.brokers(),
        &topic,
        &group,
        "",
        &format!("{CLASSIC}\"partition.assignment.strategy\" = \"cooperative-sticky\"\n"),
    );
    // The first member reads everything into one batch and holds it (no size reached, a
    // long wait) until the second member's arrival takes a partition away.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "batch_max_events = 500\nbatch_max_wait = \"100ms\"",
        "batch_max_events = 100000\nbatch_max_wait = \"20s\"",
    );
    std::fs::write(&cfg, text).unwrap();
    let mut a = Running(spawn_quiet(&mut run_config(&cfg)));
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        try_totals(&state).map_or(0, |(t, _)| t),
        0,
        "the first member stored a batch before the rebalance: nothing is dropped"
    );
    let mut b = Running(spawn_quiet(&mut run_config(&cfg)));
    let got = wait_for_total(&state, n, Duration::from_secs(90));
    // Nothing more may arrive: give a duplicate the time to show up.
    std::thread::sleep(Duration::from_secs(2));
    sigterm(&mut b.0);
    sigterm(&mut a.0);
    assert_eq!(got, n, "the broker holds {ends:?}");
    assert_eq!(totals(&state), (n, n));
}
