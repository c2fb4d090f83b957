//! The ClickHouse store against a real server.
//!
//! `KEYWATCH_TEST_CLICKHOUSE_URL` names a running server (scripts/test.sh starts one with
//! scripts/clickhouse.sh); without it, the tests start their own on a free port and stop
//! it when the last test using it ends. Every test works in a database of its own.
//! `server_down_is_transient_and_recovers` always runs a private server, since it stops it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier, Mutex, Weak};
use std::time::{Duration, Instant};

use keywatch::aggregate::Aggregate;
use keywatch::event::{AuthEvent, Outcome};
use keywatch::source::kafka::OffsetStore;
use keywatch::source::{FilePosition, PartitionOffset, Position};
use keywatch::store::clickhouse::catalog::{self, Step};
use keywatch::store::clickhouse::{
    ClickHouseConfig, ClickHouseStore, Counts, Password, ServerFeatures, Sql, Table,
    TopicPartition, SCHEMA_VERSION,
};
use keywatch::store::{
    BatchWrite, Checkpoint, Origin, SqliteStore, Store, StoreError, StoredEvent,
};

// ---------------------------------------------------------------------------------------
// Servers

struct Server {
    url: String,
    /// Set when this process started the server (and stops it on drop).
    dir: Option<tempfile::TempDir>,
    port: u16,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/clickhouse.sh")
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::Builder::new()
            .prefix("keywatch-ch-")
            .tempdir()
            .unwrap();
        let port = free_port_pair();
        let url = Self::run_start(dir.path(), port);
        Server {
            url,
            dir: Some(dir),
            port,
        }
    }

    fn run_start(dir: &Path, port: u16) -> String {
        let out = Command::new("bash")
            .arg(script())
            .args(["start", dir.to_str().unwrap(), &port.to_string()])
            .output()
            .expect("running scripts/clickhouse.sh");
        assert!(
            out.status.success(),
            "scripts/clickhouse.sh start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_owned()
    }

    fn stop(&self) {
        let dir = self.dir.as_ref().expect("only servers started here stop");
        let status = Command::new("bash")
            .arg(script())
            .args(["stop", dir.path().to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn restart(&self) {
        let dir = self.dir.as_ref().unwrap();
        Self::run_start(dir.path(), self.port);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.dir.is_some() {
            self.stop();
        }
    }
}

/// A port whose successor is free too (HTTP on the port, native TCP on the next).
fn free_port_pair() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 65_000 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// The server shared by the tests: the given one, or one started for the tests running
/// now.
fn shared_server() -> Arc<Server> {
    static SHARED: Mutex<Weak<Server>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = shared.upgrade() {
        return s;
    }
    let server = match std::env::var("KEYWATCH_TEST_CLICKHOUSE_URL") {
        Ok(url) if !url.trim().is_empty() => Server {
            url: url.trim().to_owned(),
            dir: None,
            port: 0,
        },
        _ => Server::start(),
    };
    let server = Arc::new(server);
    *shared = Arc::downgrade(&server);
    server
}

fn fresh_database() -> String {
    crate::support::clickhouse::fresh_database("kwtest")
}

fn config(server: &Server) -> ClickHouseConfig {
    ClickHouseConfig {
        url: server.url.clone(),
        database: fresh_database(),
        insert_timeout: Duration::from_secs(5),
        mutation_timeout: Duration::from_secs(60),
        // The test events are of fixed dates (November 2026): kept whatever today is.
        retention_days: 0,
        ..ClickHouseConfig::default()
    }
}

fn open(cfg: &ClickHouseConfig) -> ClickHouseStore {
    ClickHouseStore::open_standalone(cfg, None).expect("opening the ClickHouse store")
}

// ---------------------------------------------------------------------------------------
// Events and batches

/// A deterministic stream of events: `n` events from offset `first` of `partition`.
fn events(seed: u64, partition: i32, first: i64, n: usize) -> Vec<StoredEvent<'static>> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let t0: i64 = 1_795_168_800_000; // 2026-11-20T10:00:00Z
    (0..n)
        .map(|i| {
            let r = next();
            let key = format!("fp:key{}", r % 7);
            let outcome = Outcome::ALL[(r >> 8) as usize % Outcome::ALL.len()];
            let mut e = AuthEvent::new(
                t0 + (r >> 16) as i64 % 900_000,
                Cow::Owned(key),
                200,
                outcome,
            );
            // Halves add up exactly in any order.
            e.latency_ms = ((r >> 24) % 5 != 0).then(|| ((r >> 28) % 4000) as f64 / 2.0);
            e.source_ip = Some(Cow::Owned(format!("10.0.0.{}", (r >> 32) % 5)));
            e.user_agent = ((r >> 36) % 3 != 0).then_some(Cow::Borrowed("client/1.0 'quoted'"));
            e.endpoint = Some(Cow::Borrowed("/v1/orders"));
            e.gateway = Some(Cow::Borrowed("gw-1"));
            e.consumer = ((r >> 40) % 2 == 0).then(|| Cow::Owned(format!("team-{}", r % 7)));
            e.key_hint = Some(format!("…{}", r % 7));
            StoredEvent {
                event: e,
                origin: Origin {
                    partition,
                    offset: first + i as i64,
                    index: 0,
                },
            }
        })
        .collect()
}

fn aggregate(events: &[StoredEvent<'_>]) -> Aggregate {
    let mut agg = Aggregate::default();
    for e in events {
        agg.add(&e.event);
    }
    agg
}

fn kafka_position(offsets: &[(i32, i64)]) -> Position {
    Position::Kafka {
        offsets: offsets
            .iter()
            .map(|&(partition, offset)| PartitionOffset {
                topic: "gateway-logs".into(),
                partition,
                offset,
            })
            .collect(),
    }
}

const KAFKA_SRC: &str = "kafka:keywatch";

fn tp(partition: i32) -> TopicPartition {
    ("gateway-logs".to_owned(), partition)
}

fn resumed(offsets: &[(i32, i64)]) -> HashMap<TopicPartition, i64> {
    offsets.iter().map(|&(p, o)| (tp(p), o)).collect()
}

/// Commits events through a store as the pipeline does.
fn commit(
    store: &mut dyn Store,
    src: &str,
    events: &[StoredEvent<'_>],
    position: &Position,
) -> Result<(), StoreError> {
    let agg = aggregate(events);
    store.commit(&BatchWrite {
        aggregate: &agg,
        events,
        checkpoint: Some(Checkpoint {
            source: src,
            position,
        }),
    })
}

fn reference(batches: &[Vec<StoredEvent<'static>>]) -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite = SqliteStore::open(dir.path()).unwrap();
    for (i, b) in batches.iter().enumerate() {
        let p = Position::Stdin { offset: i as u64 };
        commit(&mut sqlite, "ref", b, &p).unwrap();
    }
    (dir, sqlite)
}

fn counts(n: u64, keys: u64) -> Counts {
    Counts {
        rollup_requests: n,
        event_rows: n,
        source_requests: n,
        keys,
    }
}

fn distinct_keys(batches: &[&[StoredEvent<'_>]]) -> u64 {
    let mut keys: Vec<&str> = batches
        .iter()
        .flat_map(|b| b.iter().map(|e| e.event.key_id.as_ref()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys.len() as u64
}

/// The ClickHouse reports equal the embedded store's for the same events.
fn assert_same_reports(ch: &ClickHouseStore, sqlite: &SqliteStore) {
    for since in [
        None,
        Some(1_795_168_800_000 + 300_000),
        Some(1_795_168_800_000 + 300_500),
    ] {
        let want = sqlite.key_usage(since).unwrap();
        let got = ch.key_usage(since).unwrap();
        assert_eq!(got, want, "key_usage({since:?})");
    }
    for u in sqlite.key_usage(None).unwrap() {
        let mut want = sqlite.key_sources(&u.key_id).unwrap();
        let mut got = ch.key_sources(&u.key_id).unwrap();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want, "key_sources({})", u.key_id);
    }
}

// ---------------------------------------------------------------------------------------
// Migrations

#[test]
fn migrations_from_empty_and_again() {
    let server = shared_server();
    let cfg = config(&server);
    let store = open(&cfg);
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let tables = store
        .query_tsv(&format!(
            "SELECT name FROM system.tables WHERE database = '{}' ORDER BY name",
            cfg.database
        ))
        .unwrap();
    for t in [
        "keywatch_events",
        "keywatch_rollup_minute",
        "keywatch_key_sources",
        "keywatch_keys_seen",
        "keywatch_offsets",
        "keywatch_findings",
        "keywatch_notifications",
        "keywatch_schema_migrations",
        "keywatch_rollup_minute_v",
        "keywatch_key_sources_v",
        "keywatch_keys_v",
    ] {
        assert!(tables.lines().any(|l| l == t), "{t} missing in:\n{tables}");
    }
    assert_eq!(store.counts().unwrap(), counts(0, 0));
    assert_eq!(store.latest_event_ms().unwrap(), None);
    assert_eq!(store.position(KAFKA_SRC).unwrap(), None);
    drop(store);

    // Again: nothing to do, nothing recorded twice.
    let store = open(&cfg);
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let recorded = store
        .query_tsv(&format!(
            "SELECT count() FROM {}",
            store.sql().table(Table::SchemaMigrations)
        ))
        .unwrap();
    assert_eq!(recorded.trim(), SCHEMA_VERSION.to_string());

    // A read-only store opens the same database, and refuses a missing one politely.
    let ro = ClickHouseStore::open_read_only(&cfg, None, None).unwrap();
    assert_eq!(ro.totals().unwrap(), (0, 0));
    let missing = ClickHouseConfig {
        database: fresh_database(),
        ..cfg.clone()
    };
    let err = ClickHouseStore::open_read_only(&missing, None, None).unwrap_err();
    assert!(err.to_string().contains("no keywatch tables"), "{err}");
}

#[test]
fn migrations_from_two_threads_at_once() {
    let server = shared_server();
    let cfg = config(&server);
    let threads = 4;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let cfg = cfg.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                ClickHouseStore::open_standalone(&cfg, None).map(|s| s.schema_version())
            })
        })
        .collect();
    for h in handles {
        let v = h.join().unwrap().expect("a concurrent migration failed");
        assert_eq!(v.unwrap(), SCHEMA_VERSION);
    }
    // And the schema works.
    let mut store = open(&cfg);
    let evs = events(1, 0, 0, 50);
    commit(&mut store, KAFKA_SRC, &evs, &kafka_position(&[(0, 50)])).unwrap();
    assert_eq!(store.counts().unwrap(), counts(50, distinct_keys(&[&evs])));
}

#[test]
fn refuses_a_schema_newer_than_it_knows() {
    let server = shared_server();
    let cfg = config(&server);
    let store = open(&cfg);
    store
        .execute_sql(
            &store
                .sql()
                .record_migration(SCHEMA_VERSION + 7, "keywatch from the future"),
        )
        .unwrap();
    drop(store);
    let err = ClickHouseStore::open_standalone(&cfg, None).unwrap_err();
    assert!(matches!(err, StoreError::Fatal(_)), "{err:?}");
    assert!(
        err.to_string().contains(&format!(
            "schema version {}, newer than this keywatch knows",
            SCHEMA_VERSION + 7
        )),
        "{err}"
    );
    let err = ClickHouseStore::open_read_only(&cfg, None, None).unwrap_err();
    assert!(
        err.to_string().contains("newer than this keywatch knows"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// Commits and reports

#[test]
fn kafka_batches_add_up_like_the_embedded_store() {
    let server = shared_server();
    let cfg = config(&server);
    let mut store = open(&cfg);
    assert!(store.keeps_raw_events());

    // Three batches over two partitions; one partition is missing from the last batch.
    let b1: Vec<_> = events(10, 0, 0, 300)
        .into_iter()
        .chain(events(11, 1, 1000, 200))
        .collect();
    let b2: Vec<_> = events(12, 0, 300, 250)
        .into_iter()
        .chain(events(13, 1, 1200, 100))
        .collect();
    let b3 = events(14, 1, 1300, 400);
    commit(
        &mut store,
        KAFKA_SRC,
        &b1,
        &kafka_position(&[(0, 300), (1, 1200)]),
    )
    .unwrap();
    commit(
        &mut store,
        KAFKA_SRC,
        &b2,
        &kafka_position(&[(0, 550), (1, 1300)]),
    )
    .unwrap();
    commit(&mut store, KAFKA_SRC, &b3, &kafka_position(&[(1, 1700)])).unwrap();

    let keys = distinct_keys(&[&b1, &b2, &b3]);
    assert_eq!(store.counts().unwrap(), counts(1250, keys));
    assert_eq!(store.totals().unwrap(), (1250, 1250));
    assert_eq!(
        store.position(KAFKA_SRC).unwrap(),
        Some(kafka_position(&[(0, 550), (1, 1700)]))
    );
    assert_eq!(store.position("kafka:other/topic").unwrap(), None);

    let (_dir, sqlite) = reference(&[b1.clone(), b2.clone(), b3.clone()]);
    assert_same_reports(&store, &sqlite);
    assert_eq!(
        store.latest_event_ms().unwrap(),
        sqlite.latest_event_ms().unwrap()
    );

    // A restarted instance resumes from the same offsets and counts the same.
    drop(store);
    let store = open(&cfg);
    assert_eq!(
        store.recover(KAFKA_SRC, &[tp(0), tp(1), tp(2)]).unwrap(),
        resumed(&[(0, 550), (1, 1700)])
    );
    assert_eq!(store.counts().unwrap(), counts(1250, keys));
    assert_same_reports(&store, &sqlite);
}

#[test]
fn file_positions_resume_and_a_lost_answer_counts_once() {
    let server = shared_server();
    let cfg = config(&server);
    let mut store = open(&cfg);
    let src = "file:/var/log/kong/access.log";
    let pos = |offset| {
        Position::File(FilePosition {
            path: "/var/log/kong/access.log".into(),
            dev: 2049,
            inode: 77,
            offset,
        })
    };
    let b1 = events(20, 0, 0, 120);
    let b2 = events(21, 0, 120, 80);
    commit(&mut store, src, &b1, &pos(12_000)).unwrap();
    commit(&mut store, src, &b2, &pos(20_000)).unwrap();
    assert_eq!(store.position(src).unwrap(), Some(pos(20_000)));
    // The pipeline retries a batch whose commit answer was lost: no second count.
    commit(&mut store, src, &b2, &pos(20_000)).unwrap();
    let keys = distinct_keys(&[&b1, &b2]);
    assert_eq!(store.counts().unwrap(), counts(200, keys));

    // Likewise after a restart.
    drop(store);
    let mut store = open(&cfg);
    assert_eq!(store.position(src).unwrap(), Some(pos(20_000)));
    commit(&mut store, src, &b2, &pos(20_000)).unwrap();
    assert_eq!(store.counts().unwrap(), counts(200, keys));

    // Batches without a checkpoint are stored too.
    let b3 = events(22, 0, 0, 10);
    let agg = aggregate(&b3);
    store
        .commit(&BatchWrite {
            aggregate: &agg,
            events: &b3,
            checkpoint: None,
        })
        .unwrap();
    assert_eq!(store.counts().unwrap().event_rows, 210);

    let (_dir, sqlite) = reference(&[b1, b2, b3]);
    assert_same_reports(&store, &sqlite);
}

#[test]
fn replayed_kafka_messages_count_once() {
    let server = shared_server();
    let cfg = config(&server);
    let mut store = open(&cfg);
    let all = events(30, 0, 0, 400);
    commit(
        &mut store,
        KAFKA_SRC,
        &all[..250],
        &kafka_position(&[(0, 250)]),
    )
    .unwrap();
    // The consumer went back (a rebalance before Kafka's own commit): 200..400 again.
    commit(
        &mut store,
        KAFKA_SRC,
        &all[200..],
        &kafka_position(&[(0, 400)]),
    )
    .unwrap();
    // And an exact replay of what is committed.
    commit(
        &mut store,
        KAFKA_SRC,
        &all[..250],
        &kafka_position(&[(0, 250)]),
    )
    .unwrap();
    assert_eq!(store.counts().unwrap(), counts(400, distinct_keys(&[&all])));
    assert_eq!(
        store.position(KAFKA_SRC).unwrap(),
        Some(kafka_position(&[(0, 400)]))
    );
    let (_dir, sqlite) = reference(&[all]);
    assert_same_reports(&store, &sqlite);
}

#[test]
fn topics_are_told_apart_by_their_partitions() {
    let server = shared_server();
    let cfg = config(&server);
    let mut store = open(&cfg);
    let pos = |entries: &[(&str, i32, i64)]| Position::Kafka {
        offsets: entries
            .iter()
            .map(|&(topic, partition, offset)| PartitionOffset {
                topic: topic.into(),
                partition,
                offset,
            })
            .collect(),
    };
    // Two topics, distinct partition numbers in the batch: fine.
    let b: Vec<_> = events(80, 0, 0, 40)
        .into_iter()
        .chain(events(81, 1, 0, 60))
        .collect();
    commit(
        &mut store,
        "kafka:two",
        &b,
        &pos(&[("a", 0, 40), ("b", 1, 60)]),
    )
    .unwrap();
    assert_eq!(
        store.position("kafka:two").unwrap(),
        Some(pos(&[("a", 0, 40), ("b", 1, 60)]))
    );
    assert_eq!(
        store
            .recover(
                "kafka:two",
                &[("a".into(), 0), ("b".into(), 1), ("b".into(), 0)]
            )
            .unwrap(),
        HashMap::from([(("a".to_owned(), 0), 40), (("b".to_owned(), 1), 60)])
    );
    // The same partition number of two topics with events: events carry no topic.
    let c = events(82, 0, 40, 10);
    let err = commit(
        &mut store,
        "kafka:two",
        &c,
        &pos(&[("a", 0, 50), ("b", 0, 10)]),
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::Fatal(_)), "{err:?}");
    assert!(err.to_string().contains("several topics"), "{err}");
    assert_eq!(store.counts().unwrap().event_rows, 100);
}

/// The production wiring: the store on the daemon's runtime, commits from a blocking
/// thread, recoveries from the Kafka consumer's rebalance callback (inside an async task).
#[test]
fn works_from_blocking_threads_and_async_tasks() {
    let server = shared_server();
    let cfg = config(&server);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = ClickHouseStore::open(&cfg, None, rt.handle().clone()).unwrap();
    let offsets: Arc<dyn OffsetStore> = Arc::new(store.clone());
    let b1 = events(90, 0, 0, 100);
    let pipeline = {
        let mut store = store.clone();
        let b1 = b1.clone();
        rt.spawn_blocking(move || commit(&mut store, KAFKA_SRC, &b1, &kafka_position(&[(0, 100)])))
    };
    rt.block_on(pipeline).unwrap().unwrap();

    let found = rt
        .block_on(rt.spawn(async move {
            // As in a rebalance callback: synchronous, inside the consumer's task.
            offsets.recover(KAFKA_SRC, &[tp(0), tp(1)])
        }))
        .unwrap()
        .unwrap();
    assert_eq!(found, resumed(&[(0, 100)]));
    assert_eq!(store.counts().unwrap(), counts(100, distinct_keys(&[&b1])));
    drop(store);
    rt.shutdown_timeout(Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------
// Crashes and failures

#[test]
fn crash_before_the_offsets_is_undone_by_recover() {
    let server = shared_server();
    let cfg = config(&server);
    let mut store = open(&cfg);
    let b1: Vec<_> = events(40, 0, 0, 300)
        .into_iter()
        .chain(events(41, 1, 0, 300))
        .collect();
    let b2: Vec<_> = events(42, 0, 300, 200)
        .into_iter()
        .chain(events(43, 1, 300, 100))
        .collect();
    commit(
        &mut store,
        KAFKA_SRC,
        &b1,
        &kafka_position(&[(0, 300), (1, 300)]),
    )
    .unwrap();
    // Crash between b2's rows and its offsets rows.
    let agg = aggregate(&b2);
    let p2 = kafka_position(&[(0, 500), (1, 400)]);
    store
        .commit_without_offsets(&BatchWrite {
            aggregate: &agg,
            events: &b2,
            checkpoint: Some(Checkpoint {
                source: KAFKA_SRC,
                position: &p2,
            }),
        })
        .unwrap();
    assert_eq!(store.counts().unwrap().event_rows, 900, "b2's rows landed");
    drop(store);

    // Restart: recover removes b2's rows and says where to resume.
    let mut store = open(&cfg);
    let started = Instant::now();
    let resume = store.recover(KAFKA_SRC, &[tp(0), tp(1)]).unwrap();
    eprintln!("recover with deletions took {:?}", started.elapsed());
    assert_eq!(resume, resumed(&[(0, 300), (1, 300)]));
    let keys1 = distinct_keys(&[&b1]);
    assert_eq!(store.counts().unwrap(), counts(600, keys1));
    assert_eq!(
        store.position(KAFKA_SRC).unwrap(),
        Some(kafka_position(&[(0, 300), (1, 300)]))
    );
    // Consuming again from there counts b2 once.
    commit(&mut store, KAFKA_SRC, &b2, &p2).unwrap();
    let keys = distinct_keys(&[&b1, &b2]);
    assert_eq!(store.counts().unwrap(), counts(900, keys));

    // The same within one instance: a commit that failed after writing rows (here: the
    // hook) is cleaned up by the next commit of its partitions.
    let b3 = events(44, 0, 500, 100);
    let agg = aggregate(&b3);
    let p3 = kafka_position(&[(0, 600)]);
    store
        .commit_without_offsets(&BatchWrite {
            aggregate: &agg,
            events: &b3,
            checkpoint: Some(Checkpoint {
                source: KAFKA_SRC,
                position: &p3,
            }),
        })
        .unwrap();
    commit(&mut store, KAFKA_SRC, &b3, &p3).unwrap();
    let keys = distinct_keys(&[&b1, &b2, &b3]);
    assert_eq!(store.counts().unwrap(), counts(1000, keys));

    // Partitions with nothing committed lose every row of theirs.
    let b4 = events(45, 5, 0, 30);
    let agg = aggregate(&b4);
    let p4 = kafka_position(&[(5, 30)]);
    store
        .commit_without_offsets(&BatchWrite {
            aggregate: &agg,
            events: &b4,
            checkpoint: Some(Checkpoint {
                source: KAFKA_SRC,
                position: &p4,
            }),
        })
        .unwrap();
    drop(store);
    let store = open(&cfg);
    assert_eq!(
        store.recover(KAFKA_SRC, &[tp(0), tp(1), tp(5)]).unwrap(),
        resumed(&[(0, 600), (1, 400)])
    );
    assert_eq!(store.counts().unwrap(), counts(1000, keys));

    let (_dir, sqlite) = reference(&[b1, b2, b3]);
    assert_same_reports(&store, &sqlite);
}

/// The event at one offset of one partition: the same whoever produces it.
fn event_at(partition: i32, offset: i64) -> StoredEvent<'static> {
    let seed = ((partition as u64) << 40) ^ offset as u64;
    events(seed, partition, offset, 1).pop().unwrap()
}

const KILL_PARTITIONS: [i32; 2] = [0, 3];
/// Events per partition; `KEYWATCH_KILL9_EVENTS` sets more for a longer run (more kills).
fn kill_events_per_partition() -> i64 {
    std::env::var("KEYWATCH_KILL9_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25_000)
}

/// The process `kill_dash_nine_at_any_moment_counts_exactly_once` kills: resumes from the
/// stored offsets and commits batches of random sizes until every event is stored.
#[test]
#[ignore = "run by kill_dash_nine_at_any_moment_counts_exactly_once"]
fn kill9_writer() {
    let (Ok(url), Ok(database)) = (std::env::var("KW_KILL9_URL"), std::env::var("KW_KILL9_DB"))
    else {
        panic!("run by kill_dash_nine_at_any_moment_counts_exactly_once, with KW_KILL9_URL and KW_KILL9_DB");
    };
    let cfg = ClickHouseConfig {
        url,
        database,
        insert_timeout: Duration::from_secs(5),
        // The test events are of fixed dates (November 2026): kept whatever today is.
        retention_days: 0,
        ..ClickHouseConfig::default()
    };
    let mut store = open(&cfg);
    let parts: Vec<TopicPartition> = KILL_PARTITIONS.iter().map(|p| tp(*p)).collect();
    let mut next: HashMap<i32, i64> = store
        .recover(KAFKA_SRC, &parts)
        .unwrap()
        .into_iter()
        .map(|((_, p), o)| (p, o))
        .collect();
    let mut x = std::process::id() as u64 | 1;
    loop {
        let mut batch = Vec::new();
        let mut position = Vec::new();
        for p in KILL_PARTITIONS {
            let from = next.get(&p).copied().unwrap_or(0);
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let n = ((x >> 33) % 400) as i64;
            let to = (from + n).min(kill_events_per_partition());
            batch.extend((from..to).map(|o| event_at(p, o)));
            if to > from {
                position.push((p, to));
            }
        }
        if position.is_empty() {
            return;
        }
        commit(&mut store, KAFKA_SRC, &batch, &kafka_position(&position)).unwrap();
        next.extend(position);
    }
}

#[test]
fn kill_dash_nine_at_any_moment_counts_exactly_once() {
    let server = shared_server();
    let cfg = config(&server);
    drop(open(&cfg));
    let mut x: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill -9 seed {x}");
    let started = Instant::now();
    let mut kills = 0;
    loop {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "clickhouse_store::kill9_writer",
                "--ignored",
                "--quiet",
                "--test-threads=1",
            ])
            .env("KW_KILL9_URL", &server.url)
            .env("KW_KILL9_DB", &cfg.database)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Half around the end of the store's settle time (1 s after start), when the
        // writer recovers (deletions in flight); half anywhere up to 2.3 s (mostly commits).
        let after = if x.is_multiple_of(2) {
            Duration::from_millis(900 + (x >> 1) % 600)
        } else {
            Duration::from_millis(300 + (x >> 1) % 2000)
        };
        let deadline = Instant::now() + after;
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "the writer failed: {status}");
                break true;
            }
            if Instant::now() >= deadline {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                break false;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if finished {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60 + kill_events_per_partition() as u64 / 100),
            "the writer never finished ({kills} kills)"
        );
    }
    let store = open(&cfg);
    let deletions = store
        .query_tsv(&format!(
            "SELECT count() FROM system.mutations WHERE database = '{}'",
            cfg.database
        ))
        .unwrap();
    eprintln!(
        "{kills} kills in {:?}; {} deletions of interrupted batches",
        started.elapsed(),
        deletions.trim()
    );

    let parts: Vec<TopicPartition> = KILL_PARTITIONS.iter().map(|p| tp(*p)).collect();
    store.recover(KAFKA_SRC, &parts).unwrap();
    let all: Vec<_> = KILL_PARTITIONS
        .iter()
        .flat_map(|&p| (0..kill_events_per_partition()).map(move |o| event_at(p, o)))
        .collect();
    let n = all.len() as u64;
    assert_eq!(store.counts().unwrap(), counts(n, distinct_keys(&[&all])));
    let (_dir, sqlite) = reference(&[all]);
    assert_same_reports(&store, &sqlite);
}

#[test]
fn rejected_rows_are_classified_and_the_batch_can_be_dead_lettered() {
    let server = shared_server();
    let cfg = config(&server);
    let mut store = open(&cfg);
    // A guard column that refuses one key's rollups: the events insert succeeds, the
    // rollups insert is rejected, like a value the server cannot take.
    store
        .execute_sql(&format!(
            "ALTER TABLE {} ADD COLUMN guard UInt8 MATERIALIZED throwIf(key_id = 'fp:poison')",
            store.sql().table(Table::RollupMinute)
        ))
        .unwrap();
    let good = events(50, 0, 0, 100);
    commit(&mut store, KAFKA_SRC, &good, &kafka_position(&[(0, 100)])).unwrap();

    let mut bad = events(51, 0, 100, 50);
    bad[7].event.key_id = Cow::Borrowed("fp:poison");
    let position = kafka_position(&[(0, 150)]);
    let err = commit(&mut store, KAFKA_SRC, &bad, &position).unwrap_err();
    assert!(err.is_rejected(), "{err:?}");
    assert!(err.to_string().contains("395"), "{err}");
    assert!(!err.is_transient());

    // The pipeline dead-letters the batch's events and commits its checkpoint alone: the
    // events rows the failed attempt wrote are removed.
    commit(&mut store, KAFKA_SRC, &[], &position).unwrap();
    assert_eq!(
        store.counts().unwrap(),
        counts(100, distinct_keys(&[&good]))
    );
    assert_eq!(store.position(KAFKA_SRC).unwrap(), Some(position));
}

#[test]
fn server_down_is_transient_and_recovers() {
    // A private server: this test stops it.
    let server = Server::start();
    let cfg = ClickHouseConfig {
        insert_timeout: Duration::from_secs(3),
        ..config(&server)
    };
    let mut store = open(&cfg);
    let b1 = events(60, 0, 0, 200);
    commit(&mut store, KAFKA_SRC, &b1, &kafka_position(&[(0, 200)])).unwrap();

    server.stop();
    let b2 = events(61, 0, 200, 200);
    let p2 = kafka_position(&[(0, 400)]);
    let started = Instant::now();
    let err = commit(&mut store, KAFKA_SRC, &b2, &p2).unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    for err in [
        store.position(KAFKA_SRC).unwrap_err(),
        store.recover(KAFKA_SRC, &[tp(0)]).unwrap_err(),
        store.counts().unwrap_err(),
    ] {
        assert!(err.is_transient(), "{err:?}");
    }
    let err = ClickHouseStore::open_standalone(&cfg, None).unwrap_err();
    assert!(err.is_transient(), "{err:?}");

    // The pipeline retries with backoff until the server is back.
    server.restart();
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match commit(&mut store, KAFKA_SRC, &b2, &p2) {
            Ok(()) => break,
            Err(e) if e.is_transient() && started.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(e) => panic!("after {attempts} attempts: {e:?}"),
        }
    }
    let keys = distinct_keys(&[&b1, &b2]);
    assert_eq!(store.counts().unwrap(), counts(400, keys));
}

#[test]
fn wrong_password_is_fatal_and_never_shown() {
    let server = shared_server();
    let mut cfg = config(&server);
    cfg.user = "keywatch".into();
    if std::env::var("KEYWATCH_TEST_CLICKHOUSE_URL").is_ok() {
        // A server of the caller's may have no `keywatch` user; any user works to check
        // that a wrong password is fatal and hidden.
        cfg.user = "default".into();
    }
    let secret = "hunter2-not-the-password";
    let err = ClickHouseStore::open_standalone(&cfg, Some(Password::new(secret))).unwrap_err();
    assert!(matches!(err, StoreError::Fatal(_)), "{err:?}");
    assert!(!format!("{err} {err:?}").contains(secret), "{err}");

    if server.dir.is_some() {
        // The test server's keywatch user has this password (scripts/clickhouse.sh).
        let store =
            ClickHouseStore::open_standalone(&cfg, Some(Password::new("keywatch-test"))).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    }
}

#[test]
fn raw_events_past_retention_go() {
    let server = shared_server();
    let cfg = ClickHouseConfig {
        retention_days: 30,
        ..config(&server)
    };
    let mut store = open(&cfg);
    let now = chrono::Utc::now().timestamp_millis();
    let mut evs = events(70, 0, 0, 20);
    for (i, e) in evs.iter_mut().enumerate() {
        e.event.ts_ms = if i < 5 { now - 100 * 86_400_000 } else { now };
    }
    commit(&mut store, KAFKA_SRC, &evs, &kafka_position(&[(0, 20)])).unwrap();
    store.enforce_retention().unwrap();
    if store.features().ttl {
        let engine = store.query_tsv(&store.sql().events_engine()).unwrap();
        assert!(engine.contains("TTL"), "{engine}");
    } else {
        // Rollups stay; raw events older than 30 days are gone.
        let c = store.counts().unwrap();
        assert_eq!(c.event_rows, 15);
        assert_eq!(c.rollup_requests, 20);
    }
}

// ---------------------------------------------------------------------------------------
// The SQL on a current ClickHouse

/// Runs every statement keywatch sends on this server and writes them, with this server's
/// answers, for `tests/chdb/check_schema.py` (a current ClickHouse engine) to compare.
#[test]
fn sql_catalog_runs_here_and_is_written_for_chdb() {
    let server = shared_server();
    let cfg = config(&server);
    // The store only connects here: the catalog creates a database of its own.
    let store = open(&cfg);
    let here = Sql::new(&fresh_database(), "keywatch_");
    let mut steps = catalog::build(&here, store.features());
    let mut answers: HashMap<String, String> = HashMap::new();
    for step in &mut steps {
        match step {
            Step::Execute { name, sql } => {
                store
                    .execute_sql(sql)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            Step::Insert {
                name,
                sql,
                rows,
                data_hex,
                ..
            } => {
                store
                    .insert_row_binary(sql, *rows, hex::decode(&*data_hex).unwrap())
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            Step::Query {
                name,
                sql,
                expected,
                ..
            } => {
                let got = store
                    .query_tsv(sql)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                answers.insert(name.clone(), got.clone());
                *expected = Some(got);
            }
            Step::WaitZero { name, sql } => {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let n = store
                        .query_tsv(sql)
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    if n.trim() == "0" {
                        break;
                    }
                    assert!(Instant::now() < deadline, "{name}: still {n}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
    // The answers keywatch relies on, here.
    assert_eq!(answers["schema_version"].trim(), SCHEMA_VERSION.to_string());
    assert_eq!(answers["count_uncommitted_events"].trim(), "2");
    assert_eq!(answers["count_uncommitted_after_events"].trim(), "0");
    assert_eq!(answers["totals"].trim(), "6\t6\t6\t3");
    assert!(
        answers["key_usage_all"].starts_with("fp:aaaa\t…wxyz\tbilling\t"),
        "{}",
        answers["key_usage_all"]
    );
    // The replay reads the committed events in time order, the interrupted batch left out.
    let replay: Vec<&str> = answers["replay_events_before_recovery"]
        .lines()
        .map(|l| l.split('\t').nth(1).unwrap())
        .collect();
    assert_eq!(replay, ["fp:aaaa", "fp:aaaa", "cred-123", "-", "fp:aaaa"]);
    assert_eq!(
        answers["replay_next_event_before_recovery"].trim(),
        "0\t0",
        "the interrupted batch's events are not replayed"
    );
    assert_eq!(
        answers["replay_events_page"].lines().count()
            + answers["replay_events_next_page"].lines().count(),
        4
    );
    assert!(answers["replay_next_event"].starts_with("1795255200000\t1"));
    assert!(
        answers["events_as_stored"].contains("o\\'brien\\tteam"),
        "{}",
        answers["events_as_stored"]
    );

    // The same statements for a current server, with this server's answers to compare.
    let current = Sql::new("keywatch_chdb", "keywatch_");
    let mut for_chdb = catalog::build(&current, &ServerFeatures::current());
    for step in &mut for_chdb {
        if let Step::Query {
            name,
            compare: true,
            expected,
            ..
        } = step
        {
            *expected = answers.get(name.as_str()).cloned();
        }
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("clickhouse-sql-catalog.json");
    let doc = serde_json::json!({
        "written_by": "tests/clickhouse_store.rs sql_catalog_runs_here_and_is_written_for_chdb",
        "answers_from": store.features().version,
        "steps": for_chdb,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    eprintln!("wrote {}", out.display());
}

// ---------------------------------------------------------------------------------------
// Anomaly models' warm-up

/// What a warm-up reads: rollups in order, sources sorted.
type History = (
    Vec<(String, i64, keywatch::aggregate::Rollup)>,
    Vec<(String, String, String, String, i64, i64)>,
    keywatch::store::HistoryRead,
);

fn history(store: &mut dyn Store, window_ms: i64, max_rows: u64) -> History {
    history_of(store, window_ms, max_rows, None)
}

fn history_of(
    store: &mut dyn Store,
    window_ms: i64,
    max_rows: u64,
    partitions: Option<&[TopicPartition]>,
) -> History {
    let h = store.history().expect("a history store");
    let mut rollups = Vec::new();
    let read = h
        .rollup_history(window_ms, max_rows, partitions, &mut |k, m, r| {
            rollups.push((k.to_owned(), m, r.clone()))
        })
        .unwrap();
    let mut sources = Vec::new();
    h.source_history(max_rows, partitions, &mut |(k, ip, ua, ep, f, l)| {
        sources.push((k.into(), ip.into(), ua.into(), ep.into(), f, l))
    })
    .unwrap();
    sources.sort();
    (rollups, sources, read)
}

#[test]
fn warm_up_history_reads_like_the_embedded_store() {
    let server = shared_server();
    let cfg = config(&server);
    let mut store = open(&cfg);
    let b1: Vec<_> = events(20, 0, 0, 300)
        .into_iter()
        .chain(events(21, 1, 1000, 200))
        .collect();
    let b2 = events(22, 0, 300, 250);
    commit(
        &mut store,
        KAFKA_SRC,
        &b1,
        &kafka_position(&[(0, 300), (1, 1200)]),
    )
    .unwrap();
    commit(&mut store, KAFKA_SRC, &b2, &kafka_position(&[(0, 550)])).unwrap();
    let p0: Vec<_> = b1[..300].iter().chain(&b2).cloned().collect();
    // One partition's history: what partition 0 stored, like a store that only had it.
    {
        let (_dir, mut sqlite) = reference(std::slice::from_ref(&p0));
        let (ch_rollups, ch_sources, ch_read) =
            history_of(&mut store, 86_400_000, 1_000_000, Some(&[tp(0)]));
        let (sq_rollups, sq_sources, _) = history(&mut sqlite, 86_400_000, 1_000_000);
        let sum = |v: &[(String, i64, keywatch::aggregate::Rollup)]| -> u64 {
            v.iter().map(|(_, _, r)| r.requests).sum()
        };
        assert_eq!(sum(&ch_rollups), 550);
        assert_eq!(sum(&ch_rollups), sum(&sq_rollups));
        assert_eq!(ch_rollups.len(), sq_rollups.len());
        assert_eq!(ch_sources, sq_sources);
        // The window and its cut are the whole store's (the latest minute of any partition).
        assert!(ch_read.latest_ms.is_some());
        let (none, _, _) = history_of(&mut store, 86_400_000, 1_000_000, Some(&[tp(7)]));
        assert!(none.is_empty());
        let mut seen = Vec::new();
        store
            .history()
            .unwrap()
            .key_partitions(0, &[tp(0), tp(1)], &mut |k, t, p| {
                seen.push((k.to_owned(), t.to_owned(), p))
            })
            .unwrap();
        seen.sort();
        let mut expected: Vec<(String, String, i32)> = b1
            .iter()
            .chain(&b2)
            .map(|e| {
                (
                    e.event.key_id.to_string(),
                    "gateway-logs".to_owned(),
                    e.origin.partition,
                )
            })
            .collect();
        expected.sort();
        expected.dedup();
        assert_eq!(seen, expected);
    }
    let (_dir, mut sqlite) = reference(&[b1, b2]);
    // Everything; the newest minutes within 40 rows; the last minute only.
    for (window, max_rows) in [(86_400_000, 1_000_000), (86_400_000, 40), (60_000, 1_000)] {
        let (ch_rollups, ch_sources, ch_read) = history(&mut store, window, max_rows);
        let (sq_rollups, sq_sources, sq_read) = history(&mut sqlite, window, max_rows);
        if max_rows >= 1_000 {
            assert!(!sq_rollups.is_empty());
        }
        assert_eq!(ch_read, sq_read, "window {window}, max {max_rows}");
        assert!(ch_read.rows <= max_rows);
        // Latency sums are floats added in another order: compare them apart.
        let strip = |v: &[(String, i64, keywatch::aggregate::Rollup)]| -> Vec<_> {
            v.iter()
                .map(|(k, m, r)| {
                    let mut r = r.clone();
                    let sum = r.latency_sum_ms;
                    r.latency_sum_ms = 0.0;
                    (k.clone(), *m, r, (sum * 1000.0).round())
                })
                .collect()
        };
        assert_eq!(strip(&ch_rollups), strip(&sq_rollups), "window {window}");
        if max_rows >= 1_000 {
            assert_eq!(ch_sources, sq_sources);
        } else {
            assert!(ch_read.since_ms > ch_read.latest_ms.unwrap() - window);
            assert_eq!(ch_sources.len() as u64, max_rows);
        }
    }
}
