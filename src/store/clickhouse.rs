//! The full-mode store: ClickHouse over HTTP (the `clickhouse` crate).
//!
//! # Exactly once without transactions
//!
//! ClickHouse has no multi-table transactions, and 18.16 has no insert deduplication tokens
//! for plain MergeTree tables. So every row keywatch writes carries its batch's identity:
//! `src` (the source id), `topic` and `part` (the Kafka topic partition; empty and 0 for
//! files) and `batch_end` (the batch's last offset in that partition; for files, the
//! number of batches committed before). A batch inserts `events`, `rollup_minute`,
//! `key_sources`, `keys_seen` (one insert each, rows aggregated per partition; the four sent
//! at once), then, once all four succeeded, one `offsets` row per partition: **a batch is
//! committed iff its offsets rows exist.** [`Store::commit_started`] does the same on the
//! runtime while the caller prepares the next batch; [`Store::wait_committed`] says when it
//! is done (and retries it after a transient failure, recovering first).
//! Readers sum the per-batch rows at query time.
//!
//! A crash can leave rows of a batch whose offsets row never landed. [`ClickHouseStore::
//! recover`] (at start, and when partitions are assigned: it is the Kafka source's
//! [`OffsetStore`]) deletes, per partition, every row with `batch_end >=` the committed
//! next offset (an `ALTER TABLE ... DELETE` mutation, waited for in `system.mutations`),
//! and returns the committed offsets to resume from. A failed commit marks its partitions,
//! and the next commit recovers them first, so a retried batch never counts twice (even
//! when the failure was a lost answer to an insert that did land). Kafka events at offsets
//! already committed are dropped, so a re-delivered batch is harmless too; a file batch
//! whose position is the one committed is skipped.
//!
//! # Synchronous API
//!
//! The pipeline is synchronous (it runs on `spawn_blocking`), like [`crate::store::Store`],
//! and the Kafka source asks for offsets from a synchronous rebalance callback. So the
//! store holds a `tokio` runtime handle and `block_on`s the async client (inside
//! `block_in_place`, so that a task of a multi-thread runtime may call too); the client's
//! connection tasks run on the runtime meanwhile. Not for `current_thread` runtimes.
//! Async callers can use the `*_async` methods.
//!
//! # Versions
//!
//! The SQL ([`schema`]) runs on 18.16 (Debian's package) and current versions (checked
//! against chdb by `tests/chdb/check_schema.py`). TTL for raw events and a few insert
//! settings are used where `SELECT version()` and `system.settings` say the server has them;
//! on servers without TTL, old day partitions of raw events are dropped instead.

pub mod catalog;
mod config;
mod detection;
mod error;
mod history;
mod replay;
mod rowbinary;
pub mod schema;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::clickhouse::{Client, Row, RowOwned, RowRead};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::runtime::{Handle, Runtime};

pub use config::{ClickHouseConfig, ClusterConfig, InsertCompression, Password};
pub use replay::{Replay, ReplayKey};
pub use schema::{ClusterLayout, ServerFeatures, Sql, Table};

use super::{BatchWrite, KeyUsage, SourceRow, Store, StoreError, StoredEvent};
use crate::aggregate::{Rollup, SourceKey, SourceStats, LATENCY_BUCKETS};
use crate::event::Outcome;
use crate::source::kafka::OffsetStore;
pub use crate::source::kafka::TopicPartition;
use crate::source::{PartitionOffset, Position};
use error::{classify, code_of, Phase, ALREADY_EXISTS};
use rowbinary::{encode_batch, RowBinary};

/// The schema version this keywatch creates (the number of migrations).
pub const SCHEMA_VERSION: u32 = 2;

/// How often raw events past retention are dropped on servers without TTL.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// Requests a process sent just before it died can reach the server a little later; the
/// first recovery after start waits this long after the store was opened before it
/// looks at what is still running.
const SETTLE: Duration = Duration::from_secs(1);

/// Databases this process created, by server URL and name. Nobody can have written into
/// one before: a writer sends rows only after its own `CREATE DATABASE` was answered, and
/// the database did not exist when this process looked. So the first recovery into it
/// does not wait [`SETTLE`] for a predecessor's late requests; a restart on an existing
/// database still does. Process-wide, because the daemon opens the store more than once
/// (the first opening creates the schema). Not used on a cluster, where the database is
/// looked for on one server only.
static CREATED_HERE: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn created_here(url: &str, database: &str) -> bool {
    CREATED_HERE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|(u, d)| u == url && d == database)
}

/// Report queries may scan a lot; they get longer than bookkeeping queries.
const REPORT_TIMEOUT: Duration = Duration::from_secs(600);

enum Rt {
    Handle(Handle),
    Owned(Runtime),
}

impl Rt {
    /// Runs `f` to completion on the runtime. `block_in_place` lets an async task of a
    /// multi-thread runtime call in too (the Kafka rebalance callback runs inside the
    /// consumer's task): the worker hands its other tasks over while this one blocks. On
    /// plain threads and `spawn_blocking` threads it just runs the closure.
    fn block_on<F: Future>(&self, f: F) -> F::Output {
        tokio::task::block_in_place(|| match self {
            Rt::Handle(h) => h.block_on(f),
            Rt::Owned(rt) => rt.block_on(f),
        })
    }
}

/// What is known to be committed for one source partition.
#[derive(Debug, Clone, Default)]
struct Committed {
    /// The next offset (Kafka) or batch count (files); `None`: nothing committed yet.
    next: Option<i64>,
    /// JSON of the position of files and stdin; empty for Kafka.
    position: String,
}

/// `(source, topic, partition)`; topic empty and partition 0 for files and stdin.
type StreamKey = (String, String, i32);

#[derive(Debug, Default)]
struct State {
    /// Topic partitions recovered (or committed) by this instance.
    committed: HashMap<StreamKey, Committed>,
    /// Topic partitions whose last commit failed after it may have written rows.
    dirty: HashSet<StreamKey>,
    last_retention: Option<Instant>,
}

/// The ClickHouse store. See the module documentation for the commit protocol.
///
/// Clones share the connection and what is known of committed offsets: the pipeline
/// commits through one, the Kafka source recovers assigned partitions through another (it
/// is an [`OffsetStore`]).
#[derive(Clone)]
pub struct ClickHouseStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    rt: Rt,
    sql: Sql,
    features: ServerFeatures,
    cfg: ClickHouseConfig,
    password: Option<Password>,
    state: Mutex<State>,
    /// On a cluster: the replicas that must hold an insert before it is acknowledged
    /// (`insert_quorum`), for sharded tables and for the tables every server holds; 1 (no
    /// quorum) on one server.
    quorum: Quorum,
    opened: Instant,
    /// The commit started last and not yet waited for (see [`Store::commit_started`]).
    in_flight: Mutex<Option<InFlightCommit>>,
}

impl std::fmt::Debug for ClickHouseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseStore")
            .field("config", &self.inner.cfg)
            .field("server", &self.inner.features.version)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Quorum {
    sharded: u32,
    global: u32,
    /// The cluster's shards (1 on one server).
    shards: u32,
}

#[derive(Row, Deserialize)]
struct ShardRow {
    _shard: u32,
    replicas: u64,
}

#[derive(Row, Deserialize)]
struct Count {
    n: u64,
}

#[derive(Row, Deserialize)]
struct Version {
    v: u32,
}

#[derive(Row, Deserialize)]
struct Text {
    s: String,
}

#[derive(Row, Deserialize)]
struct OffsetRow {
    topic: String,
    part: i32,
    next: i64,
    position: String,
}

#[derive(Row, Deserialize)]
struct TotalsRow {
    rollup_requests: u64,
    event_rows: u64,
    source_requests: u64,
    keys: u64,
}

#[derive(Row, Deserialize)]
struct LatestRow {
    max_ms: i64,
    keys: u64,
}

#[derive(Row, Deserialize)]
struct SourceRowCh {
    key_id: String,
    ip: String,
    user_agent: String,
    endpoint: String,
    gateway: String,
    first_seen_ms: i64,
    last_seen_ms: i64,
    requests: u64,
    failures: u64,
}

/// The columns of [`Sql::key_usage`].
#[derive(Row, Deserialize)]
struct UsageRow {
    key_id: String,
    hint: String,
    consumer: String,
    first_minute: i64,
    last_minute: i64,
    requests: u64,
    outcomes: [u64; 7],
    latency_count: u64,
    latency_sum_ms: f64,
    latency_max_ms: f64,
    latency_buckets: [u64; LATENCY_BUCKETS],
    sources: u64,
    key_first_seen_ms: i64,
    key_last_seen_ms: i64,
    key_found: u8,
}

/// Counts over the whole store, for tests and checks: every figure must agree with the
/// events produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Sum of `requests` over the per-minute rollups.
    pub rollup_requests: u64,
    /// Rows in the raw events table.
    pub event_rows: u64,
    /// Sum of `requests` over the per-key sources.
    pub source_requests: u64,
    /// Distinct keys seen.
    pub keys: u64,
}

/// Whether the host and port of an `https://` URL answer plain HTTP (`GET /ping`, two
/// seconds at most): then TLS was sent to an http port.
async fn answers_plain_http(url: &str) -> bool {
    let Ok(mut u) = reqwest::Url::parse(url.trim()) else {
        return false;
    };
    let port = u.port_or_known_default();
    if u.scheme() != "https" || u.set_scheme("http").is_err() || u.set_port(port).is_err() {
        return false;
    }
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_path("/ping");
    u.set_query(None);
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    else {
        return false;
    };
    client.get(u).send().await.is_ok()
}

impl ClickHouseStore {
    /// Connects, creates the database and tables or migrates them, and applies the
    /// retention. `runtime` runs the HTTP client; the methods block on it.
    pub fn open(
        cfg: &ClickHouseConfig,
        password: Option<Password>,
        runtime: Handle,
    ) -> Result<Self, StoreError> {
        let store = Self::connect(cfg, password, Rt::Handle(runtime))?;
        store.block_on(store.migrate())?;
        store.enforce_retention()?;
        Ok(store)
    }

    /// Like [`Self::open`], with a runtime of its own (for tools and tests without one).
    /// The last clone must not be dropped inside an async task (tokio refuses to drop a
    /// runtime there).
    pub fn open_standalone(
        cfg: &ClickHouseConfig,
        password: Option<Password>,
    ) -> Result<Self, StoreError> {
        let store = Self::connect(cfg, password, Rt::Owned(own_runtime()?))?;
        store.block_on(store.migrate())?;
        store.enforce_retention()?;
        Ok(store)
    }

    /// Connects to an existing keywatch database for reports, without creating or
    /// migrating anything. `runtime`: `None` for a runtime of its own.
    pub fn open_read_only(
        cfg: &ClickHouseConfig,
        password: Option<Password>,
        runtime: Option<Handle>,
    ) -> Result<Self, StoreError> {
        let rt = match runtime {
            Some(h) => Rt::Handle(h),
            None => Rt::Owned(own_runtime()?),
        };
        let store = Self::connect(cfg, password, rt)?;
        let version = match store.schema_version() {
            Ok(v) => v,
            Err(e) if matches!(code_of(&e.to_string()), Some(60 | 81)) => {
                return Err(StoreError::Fatal(format!(
                    "no keywatch tables in ClickHouse database {} (has `keywatch run` stored \
                     anything yet?)",
                    cfg.database
                )))
            }
            Err(e) => return Err(e),
        };
        if version > SCHEMA_VERSION {
            return Err(newer_schema(version));
        }
        Ok(store)
    }

    fn connect(
        cfg: &ClickHouseConfig,
        password: Option<Password>,
        rt: Rt,
    ) -> Result<Self, StoreError> {
        cfg.validate().map_err(|(field, reason)| {
            StoreError::Fatal(format!("clickhouse.{field}: {reason}"))
        })?;
        let mut client = new_client(cfg)?
            .with_url(cfg.url.trim())
            .with_user(cfg.user.clone())
            .with_validation(false)
            .with_compression(match cfg.compression {
                InsertCompression::Lz4 => ::clickhouse::Compression::Lz4,
                InsertCompression::None => ::clickhouse::Compression::None,
            })
            .with_product_info("keywatch", env!("CARGO_PKG_VERSION"));
        if let Some(p) = &password {
            client = client.with_password(p.expose().to_owned());
        }
        let mut sql = Sql::new(&cfg.database, &cfg.table_prefix);
        if let Some(c) = &cfg.cluster {
            sql = sql.on(ClusterLayout {
                name: c.name.clone(),
                shard_path: c.zookeeper_path.clone(),
                replica: c.replica.clone(),
                global_path: c.global_zookeeper_path.clone(),
                global_replica: c.global_replica.clone(),
            });
            // Inserts into Distributed tables wait until every shard has its rows (the
            // default queues them on this server and sends them later: the offsets row
            // could land before the rows). DDL on the cluster waits no longer than any
            // other statement (then it fails as transient and is retried; the deletions
            // of recovery are idempotent). A JOIN or IN of two Distributed tables reads
            // the right side once, on this server.
            client = client
                .with_setting("insert_distributed_sync", "1")
                .with_setting(
                    "distributed_ddl_task_timeout",
                    cfg.insert_timeout.as_secs().max(1).to_string(),
                )
                .with_setting("distributed_product_mode", "global");
        }
        let mut store = ClickHouseStore {
            inner: Arc::new(Inner {
                client,
                rt,
                quorum: Quorum {
                    sharded: 1,
                    global: 1,
                    shards: 1,
                },
                sql,
                features: ServerFeatures::new("", &[]),
                cfg: cfg.clone(),
                password,
                state: Mutex::new(State::default()),
                opened: Instant::now(),
                in_flight: Mutex::new(None),
            }),
        };
        let features = store.block_on(async {
            let version: Vec<Text> = store
                .fetch(Sql::version(), "asking the server version")
                .await?;
            let settings: Vec<Text> = store
                .fetch(&Sql::known_settings(), "listing the server's settings")
                .await?;
            let version = version.into_iter().next().map(|t| t.s).unwrap_or_default();
            let settings: Vec<String> = settings.into_iter().map(|t| t.s).collect();
            Ok::<_, StoreError>(ServerFeatures::new(&version, &settings))
        });
        let features = match features {
            // A TLS hello sent to ClickHouse's plain HTTP port is sometimes answered with a
            // 400 (rustls: "corrupt message") and sometimes read as the start of a request
            // line, and then nothing comes back: ask the port in plain HTTP to tell the two.
            Err(StoreError::Transient(m)) if store.block_on(answers_plain_http(&cfg.url)) => {
                return Err(StoreError::Fatal(format!(
                    "{m}: {}",
                    error::tls_problem("InvalidContentType").expect("a known TLS problem")
                )))
            }
            other => other?,
        };
        let quorum = match &cfg.cluster {
            Some(c) => store.block_on(store.cluster_quorum(c))?,
            None => Quorum {
                sharded: 1,
                global: 1,
                shards: 1,
            },
        };
        let inner = Arc::get_mut(&mut store.inner).expect("no clone of a store being connected");
        inner.features = features;
        inner.quorum = quorum;
        tracing::info!(
            url = %config::redact_url(&cfg.url),
            server = %store.inner.features.version,
            ttl = store.inner.features.ttl,
            "connected to ClickHouse"
        );
        Ok(store)
    }

    /// The cluster's shape from `system.clusters`, and the quorums it gives (see
    /// [`ClusterConfig::insert_quorum`]).
    async fn cluster_quorum(&self, c: &ClusterConfig) -> Result<Quorum, StoreError> {
        let shards: Vec<ShardRow> = self
            .fetch(
                &Sql::cluster_shards(&c.name),
                "reading the cluster from system.clusters",
            )
            .await?;
        if shards.is_empty() {
            return Err(StoreError::Fatal(format!(
                "store.clickhouse.cluster.name: the server at store.clickhouse.url knows no \
                 cluster `{}` (its <remote_servers>, system.clusters)",
                c.name
            )));
        }
        let smallest = shards.iter().map(|s| s.replicas).min().unwrap_or(1) as u32;
        let servers = shards.iter().map(|s| s.replicas).sum::<u64>() as u32;
        let n_shards = shards.len() as u32;
        let quorum = match c.insert_quorum {
            0 => Quorum {
                sharded: smallest / 2 + 1,
                global: servers / 2 + 1,
                shards: n_shards,
            },
            n => Quorum {
                sharded: n.min(smallest),
                global: n.min(servers),
                shards: n_shards,
            },
        };
        tracing::info!(
            cluster = %c.name,
            shards = shards.len(),
            servers,
            quorum_sharded = quorum.sharded,
            quorum_global = quorum.global,
            "ClickHouse cluster"
        );
        Ok(quorum)
    }

    /// The server's `version()` and what keywatch uses of it.
    pub fn features(&self) -> &ServerFeatures {
        &self.inner.features
    }

    /// The statements of this database and prefix.
    pub fn sql(&self) -> &Sql {
        &self.inner.sql
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.inner.rt.block_on(f)
    }

    fn in_flight(&self) -> MutexGuard<'_, Option<InFlightCommit>> {
        self.inner
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pw(&self) -> Option<&str> {
        self.inner.password.as_ref().map(Password::expose)
    }

    /// Runs a client future with a deadline; errors are classified for `phase`.
    async fn timed<T>(
        &self,
        timeout: Duration,
        phase: Phase,
        what: &str,
        f: impl Future<Output = ::clickhouse::error::Result<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(&e, phase, what, self.pw())),
            Err(_) => Err(StoreError::Transient(format!(
                "{what}: no answer from ClickHouse within {timeout:?}"
            ))),
        }
    }

    async fn exec(&self, sql: &str, what: &str) -> Result<(), StoreError> {
        self.timed(
            self.inner.cfg.insert_timeout,
            Phase::Query,
            what,
            self.inner.client.query_raw(sql).execute(),
        )
        .await
    }

    /// DDL that a concurrent migration may have run first: "already exists" is success.
    async fn exec_ddl(&self, sql: &str, what: &str) -> Result<(), StoreError> {
        let f = self.inner.client.query_raw(sql).execute();
        match tokio::time::timeout(self.inner.cfg.insert_timeout, f).await {
            Ok(Err(::clickhouse::error::Error::BadResponse(body)))
                if code_of(&body).is_some_and(|c| ALREADY_EXISTS.contains(&c)) =>
            {
                Ok(())
            }
            Ok(Err(e)) => Err(classify(&e, Phase::Query, what, self.pw())),
            Ok(Ok(())) => Ok(()),
            Err(_) => Err(StoreError::Transient(format!(
                "{what}: no answer from ClickHouse within {:?}",
                self.inner.cfg.insert_timeout
            ))),
        }
    }

    async fn fetch<T: RowOwned + RowRead>(
        &self,
        sql: &str,
        what: &str,
    ) -> Result<Vec<T>, StoreError> {
        self.fetch_within(self.inner.cfg.insert_timeout, sql, what)
            .await
    }

    async fn fetch_within<T: RowOwned + RowRead>(
        &self,
        timeout: Duration,
        sql: &str,
        what: &str,
    ) -> Result<Vec<T>, StoreError> {
        self.timed(
            timeout,
            Phase::Query,
            what,
            self.inner.client.query_raw(sql).fetch_all::<T>(),
        )
        .await
    }

    async fn count(&self, sql: &str, what: &str) -> Result<u64, StoreError> {
        let rows: Vec<Count> = self.fetch(sql, what).await?;
        Ok(rows.first().map_or(0, |c| c.n))
    }

    /// One INSERT of RowBinary rows, as one request.
    async fn insert(&self, table: Table, rows: &RowBinary, phase: Phase) -> Result<(), StoreError> {
        let what = format!(
            "inserting {} rows into {}",
            rows.rows,
            self.inner.sql.name(table)
        );
        self.insert_with(
            self.inner.sql.insert(table),
            &what,
            rows,
            phase,
            Some(table),
        )
        .await
    }

    /// [`Self::insert`] of batch rows, and how long it took.
    async fn timed_insert(
        &self,
        (table, rows): (Table, &RowBinary),
    ) -> (Result<(), StoreError>, Duration) {
        let t = Instant::now();
        let r = self.insert(table, rows, Phase::InsertRows).await;
        (r, t.elapsed())
    }

    /// `table`: the table written, for the settings a cluster needs (`None`: none).
    async fn insert_with(
        &self,
        sql: String,
        what: &str,
        rows: &RowBinary,
        phase: Phase,
        table: Option<Table>,
    ) -> Result<(), StoreError> {
        if rows.rows == 0 {
            return Ok(());
        }
        let timeout = self.inner.cfg.insert_timeout;
        let mut insert = self
            .inner
            .client
            .insert_formatted_with(sql)
            .with_timeouts(Some(timeout), Some(timeout));
        for (name, value) in &self.inner.features.insert_settings {
            insert = insert.with_setting(*name, *value);
        }
        if let (Some(t), Some(_)) = (table, &self.inner.sql.cluster) {
            let quorum = if t.is_sharded() {
                self.inner.quorum.sharded
            } else {
                self.inner.quorum.global
            };
            if quorum > 1 {
                insert = insert
                    .with_setting("insert_quorum", quorum.to_string())
                    .with_setting(
                        "insert_quorum_timeout",
                        self.inner.cfg.insert_timeout.as_millis().to_string(),
                    );
            }
            if Table::BATCH_ROWS.contains(&t) {
                // A batch retried after recovery deleted its first attempt's rows is the
                // same bytes: replicated block deduplication would drop it as a repeat of
                // rows that are gone. Batch rows are made exact by recovery instead.
                insert = insert.with_setting("insert_deduplicate", "0");
            }
        }
        let mut w = insert.buffered_with_capacity(256 * 1024);
        let send = async {
            w.write_all(&rows.buf)
                .await
                .map_err(::clickhouse::error::Error::from)?;
            w.end().await
        };
        // The client's timeouts bound each step; this bounds the whole.
        self.timed(timeout * 2, phase, what, send).await
    }

    /// The schema version recorded in the database (0 for none).
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.block_on(self.schema_version_async())
    }

    async fn schema_version_async(&self) -> Result<u32, StoreError> {
        let rows: Vec<Version> = self
            .fetch(
                &self.inner.sql.schema_version(),
                "reading the schema version",
            )
            .await?;
        Ok(rows.first().map_or(0, |v| v.v))
    }

    /// Creates the database and applies the migrations this keywatch knows. Every
    /// statement is idempotent, so two instances starting at once both succeed. A schema
    /// that is up to date sends no DDL: on a cluster, DDL runs `ON CLUSTER` and waits for
    /// every server, so a restart while one is down (or while its distributed DDL worker
    /// has stopped, see `recover_async`) would wait for it.
    async fn migrate(&self) -> Result<(), StoreError> {
        let database_exists = self
            .count(
                &self.inner.sql.database_exists(),
                "looking for the database",
            )
            .await?
            > 0;
        if !database_exists {
            self.exec_ddl(&self.inner.sql.create_database(), "creating the database")
                .await?;
            if self.inner.sql.cluster.is_none() {
                let cfg = &self.inner.cfg;
                CREATED_HERE
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((cfg.url.clone(), cfg.database.clone()));
            }
        }
        let table_exists = database_exists
            && self
                .count(
                    &self.inner.sql.migrations_table_exists(),
                    "looking for the migrations table",
                )
                .await?
                > 0;
        if !table_exists {
            self.exec_ddl(
                &self.inner.sql.create_migrations_table(),
                "creating the migrations table",
            )
            .await?;
        }
        let current = self.schema_version_async().await?;
        let migrations = self
            .inner
            .sql
            .migrations(&self.inner.features, self.inner.cfg.retention_days);
        debug_assert_eq!(migrations.len(), SCHEMA_VERSION as usize);
        if current as usize > migrations.len() {
            return Err(newer_schema(current));
        }
        for (i, statements) in migrations.iter().enumerate().skip(current as usize) {
            let version = i as u32 + 1;
            let what = format!("migrating the schema to version {version}");
            for s in statements {
                self.exec_ddl(s, &what).await?;
            }
            self.exec(
                &self
                    .inner
                    .sql
                    .record_migration(version, concat!("keywatch ", env!("CARGO_PKG_VERSION"))),
                &what,
            )
            .await?;
            tracing::info!(version, database = %self.inner.cfg.database, "ClickHouse schema migrated");
        }
        Ok(())
    }

    /// Removes raw events past `retention_days`: sets the TTL where the server has TTL
    /// (when it differs), else drops day partitions older than the retention.
    pub fn enforce_retention(&self) -> Result<(), StoreError> {
        self.block_on(self.enforce_retention_async())
    }

    async fn enforce_retention_async(&self) -> Result<(), StoreError> {
        self.lock().last_retention = Some(Instant::now());
        let days = self.inner.cfg.retention_days;
        if days == 0 {
            return Ok(());
        }
        if self.inner.features.ttl {
            let engine: Vec<Text> = self
                .fetch(
                    &self.inner.sql.events_engine(),
                    "reading the events table's TTL",
                )
                .await?;
            let current = engine.first().map(|t| t.s.as_str()).unwrap_or("");
            if !current.contains(&schema::ttl_in_engine(days)) {
                self.exec(&self.inner.sql.modify_ttl(days), "setting the events TTL")
                    .await?;
                tracing::info!(days, "ClickHouse TTL of raw events set");
            }
            return Ok(());
        }
        let cutoff: u32 = (chrono::Utc::now() - chrono::Duration::days(i64::from(days)))
            .format("%Y%m%d")
            .to_string()
            .parse()
            .unwrap_or(0);
        let parts: Vec<Text> = self
            .fetch(
                &self.inner.sql.event_partitions(),
                "listing event partitions",
            )
            .await?;
        for p in parts {
            if let Ok(day) = p.s.trim_matches('\'').parse::<u32>() {
                if day < cutoff {
                    self.exec(
                        &self.inner.sql.drop_event_partition(day),
                        "dropping raw events past retention",
                    )
                    .await?;
                    tracing::info!(day, "raw events past retention dropped");
                }
            }
        }
        Ok(())
    }

    /// On a cluster with a quorum, with `select_sequential_consistency`: this server
    /// answers only once it holds every offsets row acknowledged to any instance (a
    /// partition that moved here from an instance writing through another server resumes
    /// from its last commit, not an older one).
    async fn read_offsets(&self, src: &str) -> Result<Vec<OffsetRow>, StoreError> {
        let what = "reading committed offsets";
        let mut q = self
            .inner
            .client
            .query_raw(&self.inner.sql.read_offsets(src));
        if self.inner.quorum.global > 1 {
            q = q.with_setting("select_sequential_consistency", "1");
        }
        self.timed(
            self.inner.cfg.insert_timeout,
            Phase::Query,
            what,
            q.fetch_all::<OffsetRow>(),
        )
        .await
    }

    /// Waits until every insert or deletion into this database that runs now has finished:
    /// a process killed after sending one (or this one, after a timeout) does not stop it
    /// on the server, and one finishing after recovery would leave rows of an uncommitted
    /// batch (an insert) or remove committed ones (a deletion computed from older offsets).
    async fn drain_writes(&self) -> Result<(), StoreError> {
        let settle = (self.inner.opened + SETTLE).saturating_duration_since(Instant::now());
        if !settle.is_zero() && !created_here(&self.inner.cfg.url, &self.inner.cfg.database) {
            tokio::time::sleep(settle).await;
        }
        let running: Vec<Text> = self
            .fetch(
                &self.inner.sql.running_writes(),
                "looking for writes in progress",
            )
            .await?;
        if running.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = running.into_iter().map(|t| t.s).collect();
        tracing::info!(
            writes = ids.len(),
            "waiting for writes in progress before recovering"
        );
        let deadline = Instant::now() + self.inner.cfg.mutation_timeout;
        let mut delay = Duration::from_millis(20);
        loop {
            let n = self
                .count(&Sql::still_running(&ids), "waiting for writes in progress")
                .await?;
            if n == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Transient(format!(
                    "{n} writes into database {} still running after {:?}",
                    self.inner.cfg.database, self.inner.cfg.mutation_timeout
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Waits until no deletion keywatch may have started runs on its tables.
    ///
    /// Not on a cluster: 18.16 never mutates the last part written with a quorum in a
    /// partition (`select_sequential_consistency` checks it by name) until another quorum
    /// insert lands there, so waiting before the next commit could wait for ever. A
    /// registered mutation is bound to the block numbers before it, so rows written
    /// after it are never touched; running ALTERs are waited for by `drain_writes`.
    async fn wait_mutations(&self) -> Result<(), StoreError> {
        if self.inner.sql.cluster.is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + self.inner.cfg.mutation_timeout;
        let mut delay = Duration::from_millis(20);
        loop {
            let pending = self
                .count(&self.inner.sql.pending_mutations(), "watching deletions")
                .await?;
            if pending == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Transient(format!(
                    "{pending} deletions in database {} still running after {:?}",
                    self.inner.cfg.database, self.inner.cfg.mutation_timeout
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// Makes `partitions` of `src` exact: deletes the rows of batches written but never
    /// committed, and returns the committed next offset of each topic partition that has one
    /// (Kafka: resume there; one missing from the map has nothing committed). Files and
    /// stdin are the topic partition `("", 0)`.
    ///
    /// Call it at start and whenever partitions are (re)assigned, before consuming them,
    /// and not while a batch of the same partitions is being committed. Commits recover
    /// partitions this instance has not seen by themselves.
    pub fn recover(
        &self,
        src: &str,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, StoreError> {
        self.block_on(self.recover_async(src, partitions))
    }

    /// [`Self::recover`] for async callers.
    pub async fn recover_async(
        &self,
        src: &str,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, StoreError> {
        // Late writes first: offsets read before a late insert of offsets lands would be
        // stale, and a late deletion would apply to what this recovery keeps.
        self.drain_writes().await?;
        self.wait_mutations().await?;
        let rows = self.read_offsets(src).await?;
        let by_stream: HashMap<(&str, i32), &OffsetRow> = rows
            .iter()
            .map(|r| ((r.topic.as_str(), r.part), r))
            .collect();
        let mut parts: Vec<(&str, i32)> =
            partitions.iter().map(|(t, p)| (t.as_str(), *p)).collect();
        parts.sort_unstable();
        parts.dedup();
        if !parts.is_empty() {
            let spec: Vec<(&str, i32, Option<i64>)> = parts
                .iter()
                .map(|&(t, p)| (t, p, by_stream.get(&(t, p)).map(|r| r.next)))
                .collect();
            let filter = Sql::uncommitted_filter(src, &spec);
            let mut deleted = 0;
            for t in Table::BATCH_ROWS {
                let n = self
                    .count(
                        &self.inner.sql.count_where(t, &filter),
                        "looking for rows of uncommitted batches",
                    )
                    .await?;
                // On a cluster the count reads one replica per shard: a replica may
                // hold rows of an interrupted batch that the one read has not fetched
                // yet. The deletion, replicated, reaches them all.
                if n > 0 || self.inner.sql.cluster.is_some() {
                    // One shard: its replicas share the mutation (see `delete_where_here`),
                    // and no server's distributed DDL worker is needed. ClickHouse 18.16's
                    // stops for good when its server was stopped while executing an ALTER
                    // ON CLUSTER ("DDLWorker: Unexpected ZooKeeper error ... Node exists
                    // ... Terminating"; later versions restart it, ClickHouse PR 18285):
                    // every ON CLUSTER statement then waits for that server until restarted.
                    let sql = if self.inner.quorum.shards == 1 {
                        self.inner.sql.delete_where_here(t, &filter)
                    } else {
                        self.inner.sql.delete_where(t, &filter)
                    };
                    self.exec(&sql, "deleting rows of uncommitted batches")
                        .await?;
                    deleted += n;
                }
            }
            if deleted > 0 {
                tracing::warn!(
                    src,
                    rows = deleted,
                    "removing rows of batches interrupted before their commit"
                );
                metrics::counter!("keywatch_clickhouse_uncommitted_rows_removed_total")
                    .increment(deleted);
                self.wait_mutations().await?;
            }
        }
        let mut st = self.lock();
        let mut out = HashMap::new();
        for (t, p) in parts {
            let key = (src.to_owned(), t.to_owned(), p);
            let committed = by_stream
                .get(&(t, p))
                .map_or_else(Committed::default, |r| Committed {
                    next: Some(r.next),
                    position: r.position.clone(),
                });
            if let Some(n) = committed.next {
                out.insert((t.to_owned(), p), n);
            }
            st.dirty.remove(&key);
            st.committed.insert(key, committed);
        }
        Ok(out)
    }

    async fn position_async(&self, src: &str) -> Result<Option<Position>, StoreError> {
        let rows = self.read_offsets(src).await?;
        if rows.iter().any(|r| !r.topic.is_empty()) {
            let offsets = rows
                .into_iter()
                .filter(|r| !r.topic.is_empty())
                .map(|r| PartitionOffset {
                    topic: r.topic,
                    partition: r.part,
                    offset: r.next,
                })
                .collect();
            return Ok(Some(Position::Kafka { offsets }));
        }
        match rows.into_iter().find(|r| r.part == 0) {
            Some(r) if !r.position.is_empty() => serde_json::from_str(&r.position)
                .map(Some)
                .map_err(|e| StoreError::Fatal(format!("stored position of {src}: {e}"))),
            _ => Ok(None),
        }
    }

    /// Writes a batch (see the module documentation). `write_offsets: false` stops before
    /// the commit point, as a crash there would (tests only).
    async fn commit_async(
        &self,
        batch: &BatchWrite<'_, '_>,
        write_offsets: bool,
    ) -> Result<(), StoreError> {
        match self.prepare(batch).await? {
            Some(p) => self.write_prepared(&p, write_offsets).await,
            None => Ok(()),
        }
    }

    /// The first half of a commit: recovers the batch's partitions when needed, works out
    /// the batch's identity and encodes its rows. `None`: nothing left to write (a replay
    /// of committed messages, or a file batch committed by an attempt whose answer was
    /// lost).
    async fn prepare(&self, batch: &BatchWrite<'_, '_>) -> Result<Option<Prepared>, StoreError> {
        if batch.events.is_empty() && batch.aggregate.events > 0 {
            return Err(StoreError::Fatal(
                "the ClickHouse store needs the batch's raw events (keeps_raw_events); \
                 commit a dead-lettered batch with an empty aggregate"
                    .into(),
            ));
        }
        let src = batch.checkpoint.map_or("", |c| c.source);

        // Per topic partition, the next offset the checkpoint moves to (Kafka); or the
        // position JSON (files, stdin, none: one sequence of batches in ("", 0)).
        let mut kafka: Option<BTreeMap<(String, i32), i64>> = None;
        let mut position = String::new();
        match batch.checkpoint.map(|c| c.position) {
            Some(Position::Kafka { offsets }) => {
                let mut m = BTreeMap::new();
                for o in offsets {
                    let e = m.entry((o.topic.clone(), o.partition)).or_insert(o.offset);
                    *e = (*e).max(o.offset);
                }
                kafka = Some(m);
            }
            Some(p) => {
                position = serde_json::to_string(p)
                    .map_err(|e| StoreError::Fatal(format!("position: {e}")))?;
            }
            None => {}
        }
        let streams: Vec<(String, i32)> = match &kafka {
            Some(m) => m.keys().cloned().collect(),
            None => vec![(String::new(), 0)],
        };
        let topics = EventTopics::new(&streams);
        for se in batch.events {
            topics.of(src, se)?;
        }

        // Recover topic partitions this instance does not know, or whose last commit failed.
        let need: Vec<TopicPartition> = {
            let st = self.lock();
            streams
                .iter()
                .filter(|(t, p)| {
                    let k = (src.to_owned(), t.clone(), *p);
                    !st.committed.contains_key(&k) || st.dirty.contains(&k)
                })
                .cloned()
                .collect()
        };
        let started = Instant::now();
        let mut timings = CommitTimings::default();
        if !need.is_empty() {
            self.recover_async(src, &need).await?;
        }
        timings.recover = started.elapsed();

        // Batch identity per topic partition, leaving out what is committed already.
        let mut batch_end: HashMap<(&str, i32), i64> = HashMap::new();
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        let mut keep_from: HashMap<(&str, i32), i64> = HashMap::new();
        {
            let st = self.lock();
            let committed = |t: &str, p: i32| {
                st.committed
                    .get(&(src.to_owned(), t.to_owned(), p))
                    .cloned()
                    .unwrap_or_default()
            };
            match &kafka {
                Some(m) => {
                    for ((t, p), &n) in m {
                        let c = committed(t, *p).next;
                        if c.is_some_and(|c| n <= c) {
                            continue; // a replay of committed messages
                        }
                        batch_end.insert((t.as_str(), *p), n - 1);
                        next.insert((t.as_str(), *p), n);
                        keep_from.insert((t.as_str(), *p), c.unwrap_or(i64::MIN));
                    }
                }
                None => {
                    let c = committed("", 0);
                    if !position.is_empty() && c.position == position {
                        return Ok(None); // committed by an attempt whose answer was lost
                    }
                    let end = c.next.unwrap_or(0);
                    batch_end.insert(("", 0), end);
                    next.insert(("", 0), end + 1);
                    keep_from.insert(("", 0), i64::MIN);
                }
            }
        }
        if next.is_empty() {
            return Ok(None);
        }

        // The streams written, in (topic, partition) order. Events carry their partition
        // only, which names one stream here (`EventTopics` refused a batch where it would
        // not): a short list searched by partition, the last hit first, rather than a hash
        // of (topic, partition) per event (about 7 % of keywatch's CPU, perf).
        let ids: Vec<(rowbinary::BatchId<'_>, i64)> = next
            .keys()
            .map(|&(topic, part)| {
                (
                    rowbinary::BatchId {
                        src,
                        topic,
                        part,
                        batch_end: batch_end[&(topic, part)],
                    },
                    keep_from[&(topic, part)],
                )
            })
            .collect();
        let mut selected = Vec::with_capacity(batch.events.len());
        let mut last: Option<(i32, usize)> = None;
        for se in batch.events {
            let part = se.origin.partition;
            let found = match last {
                Some((p, i)) if p == part => Some(i),
                _ => ids.iter().position(|(id, _)| id.part == part),
            };
            let Some(i) = found else {
                continue; // a partition whose messages are all committed
            };
            last = Some((part, i));
            let (id, keep_from) = &ids[i];
            if se.origin.offset < *keep_from {
                continue;
            }
            if kafka.is_some() && se.origin.offset > id.batch_end {
                return Err(StoreError::Fatal(format!(
                    "source {src}: an event at offset {} of partition {} is past the batch's \
                     checkpoint ({})",
                    se.origin.offset,
                    part,
                    id.batch_end + 1
                )));
            }
            selected.push((&se.event, &se.origin, i));
        }
        let selected_events = selected.len();
        // One stream and every event of the batch: the batch's aggregate is the stream's
        // (the pipeline folded exactly these events), so it is not folded again.
        let whole = (ids.len() == 1
            && selected_events == batch.events.len()
            && batch.aggregate.events == selected_events as u64)
            .then_some(batch.aggregate);
        let ids: Vec<rowbinary::BatchId<'_>> = ids.into_iter().map(|(id, _)| id).collect();
        let encoded = encode_batch(&selected, &ids, whole);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut offsets = RowBinary::default();
        for (id, n) in ids.iter().zip(next.values()) {
            offsets.offset(id, *n, &position, now_ms);
        }
        timings.encode = started.elapsed() - timings.recover;
        Ok(Some(Prepared {
            src: src.to_owned(),
            next: next
                .into_iter()
                .map(|((t, p), n)| ((t.to_owned(), p), n))
                .collect(),
            position,
            encoded,
            offsets,
            events: selected_events,
            timings,
        }))
    }

    /// The second half of a commit: the rows, then the offsets row (the commit point).
    async fn write_prepared(&self, p: &Prepared, write_offsets: bool) -> Result<(), StoreError> {
        let src = p.src.as_str();
        let mut timings = p.timings;
        {
            let mut st = self.lock();
            for (t, part) in p.next.keys() {
                st.dirty.insert((src.to_owned(), t.clone(), *part));
            }
        }
        // The four tables are independent until the offsets row: send them at once, each
        // on a connection of its own, so the batch waits for the slowest insert instead of
        // the sum. Any failure leaves the partitions dirty (recovered before the next try).
        let rows_started = Instant::now();
        let [ev, ro, so, ke] = p.encoded.tables();
        timings.bytes = [ev, ro, so, ke]
            .iter()
            .map(|(_, r)| r.buf.len() as u64)
            .sum();
        let (ev, ro, so, ke) = tokio::join!(
            self.timed_insert(ev),
            self.timed_insert(ro),
            self.timed_insert(so),
            self.timed_insert(ke)
        );
        timings.rows = rows_started.elapsed();
        timings.tables = [ev.1, ro.1, so.1, ke.1];
        ev.0?;
        ro.0?;
        so.0?;
        ke.0?;
        if !write_offsets {
            return Ok(());
        }
        let offsets_started = Instant::now();
        self.insert(Table::Offsets, &p.offsets, Phase::Query)
            .await?;
        timings.offsets = offsets_started.elapsed();
        timings.log(p.events);
        let retention_due = {
            let mut st = self.lock();
            for ((t, part), n) in &p.next {
                let k = (src.to_owned(), t.clone(), *part);
                st.dirty.remove(&k);
                st.committed.insert(
                    k,
                    Committed {
                        next: Some(*n),
                        position: p.position.clone(),
                    },
                );
            }
            !self.inner.features.ttl
                && self.inner.cfg.retention_days > 0
                && st
                    .last_retention
                    .is_none_or(|t| t.elapsed() >= RETENTION_EVERY)
        };
        if retention_due {
            if let Err(e) = self.enforce_retention_async().await {
                tracing::warn!(error = %e, "could not drop raw events past retention");
            }
        }
        Ok(())
    }

    /// Writes a prepared commit again after a failed attempt: its partitions are recovered
    /// first (the attempt's rows removed, unless its offsets row landed and only the answer
    /// was lost: then it is committed and nothing is written).
    async fn retry_prepared(&self, p: &Prepared) -> Result<(), StoreError> {
        let parts: Vec<TopicPartition> = p.next.keys().cloned().collect();
        self.recover_async(&p.src, &parts).await?;
        let done = {
            let st = self.lock();
            p.next.iter().all(|((t, part), n)| {
                st.committed
                    .get(&(p.src.clone(), t.clone(), *part))
                    .is_some_and(|c| {
                        c.next.is_some_and(|c| c >= *n)
                            && (p.position.is_empty() || c.position == p.position)
                    })
            })
        };
        if done {
            return Ok(());
        }
        self.write_prepared(p, true).await
    }

    /// Test hook (feature `test-hooks`): writes a batch's rows but not its offsets, as a
    /// crash between the two would.
    #[cfg(feature = "test-hooks")]
    pub fn commit_without_offsets(&mut self, batch: &BatchWrite<'_, '_>) -> Result<(), StoreError> {
        self.block_on(self.commit_async(batch, false))
    }

    /// Test hook: runs one statement.
    #[doc(hidden)]
    pub fn execute_sql(&self, sql: &str) -> Result<(), StoreError> {
        self.block_on(self.exec(sql, "running a statement"))
    }

    /// Test hook: one query's result as TabSeparated text.
    #[doc(hidden)]
    pub fn query_tsv(&self, sql: &str) -> Result<String, StoreError> {
        self.block_on(async {
            let what = "running a query";
            let mut cursor = self
                .inner
                .client
                .query_raw(sql)
                .fetch_bytes("TabSeparated")
                .map_err(|e| classify(&e, Phase::Query, what, self.pw()))?;
            let bytes = self
                .timed(REPORT_TIMEOUT, Phase::Query, what, cursor.collect())
                .await?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        })
    }

    /// Test hook: one RowBinary insert (`INSERT ... FORMAT RowBinary`) as keywatch sends
    /// it, with the server's insert settings.
    #[doc(hidden)]
    pub fn insert_row_binary(
        &self,
        sql: &str,
        rows: usize,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        let rb = RowBinary::from_parts(data, rows);
        self.inner.rt.block_on(self.insert_with(
            sql.to_owned(),
            "inserting",
            &rb,
            Phase::InsertRows,
            None,
        ))
    }

    /// Usage per key over rollups with `minute >= since_ms` (all time without it), busiest
    /// first; the same figures as [`super::SqliteStore::key_usage`].
    pub fn key_usage(&self, since_ms: Option<i64>) -> Result<Vec<KeyUsage>, StoreError> {
        // Like SQLite's `minute >= since_s`: a start inside a minute leaves that minute out.
        let since_s = since_ms.map(rowbinary::seconds);
        let rows: Vec<UsageRow> = self.block_on(self.fetch_within(
            REPORT_TIMEOUT,
            &self.inner.sql.key_usage(since_s),
            "reading key usage",
        ))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let first_minute_ms = r.first_minute * 1000;
                let last_minute_end_ms = r.last_minute * 1000 + 59_999;
                let found = r.key_found == 1;
                KeyUsage {
                    key_id: r.key_id,
                    hint: Some(r.hint).filter(|h| !h.is_empty()),
                    consumer: Some(r.consumer).filter(|c| !c.is_empty()),
                    first_seen_ms: if found {
                        r.key_first_seen_ms.max(first_minute_ms)
                    } else {
                        first_minute_ms
                    },
                    last_seen_ms: if found {
                        r.key_last_seen_ms.min(last_minute_end_ms)
                    } else {
                        last_minute_end_ms
                    },
                    totals: Rollup {
                        requests: r.requests,
                        outcomes: r.outcomes,
                        latency_count: r.latency_count,
                        latency_sum_ms: r.latency_sum_ms,
                        latency_max_ms: r.latency_max_ms,
                        latency_buckets: r.latency_buckets,
                    },
                    sources: r.sources,
                }
            })
            .collect())
    }

    /// The sources of one key, most recently seen first.
    pub fn key_sources(&self, key_id: &str) -> Result<Vec<SourceRow>, StoreError> {
        let rows: Vec<SourceRowCh> = self.block_on(self.fetch_within(
            REPORT_TIMEOUT,
            &self.inner.sql.key_sources(key_id),
            "reading key sources",
        ))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    SourceKey {
                        key_id: r.key_id,
                        ip: r.ip,
                        user_agent: r.user_agent,
                        endpoint: r.endpoint,
                        gateway: r.gateway,
                    },
                    SourceStats {
                        first_seen_ms: r.first_seen_ms,
                        last_seen_ms: r.last_seen_ms,
                        requests: r.requests,
                        failures: r.failures,
                    },
                )
            })
            .collect())
    }

    /// Requests in the rollups and rows in the raw events table (they must agree).
    pub fn totals(&self) -> Result<(u64, u64), StoreError> {
        let c = self.counts()?;
        Ok((c.rollup_requests, c.event_rows))
    }

    /// Every count the tables must agree on.
    pub fn counts(&self) -> Result<Counts, StoreError> {
        let rows: Vec<TotalsRow> = self.inner.rt.block_on(self.fetch_within(
            REPORT_TIMEOUT,
            &self.inner.sql.totals(),
            "counting",
        ))?;
        let r = rows
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Fatal("counting: ClickHouse returned no row".into()))?;
        Ok(Counts {
            rollup_requests: r.rollup_requests,
            event_rows: r.event_rows,
            source_requests: r.source_requests,
            keys: r.keys,
        })
    }

    /// The latest event time stored, if any.
    pub fn latest_event_ms(&self) -> Result<Option<i64>, StoreError> {
        let rows: Vec<LatestRow> = self.block_on(self.fetch_within(
            REPORT_TIMEOUT,
            &self.inner.sql.latest_event(),
            "reading the latest event",
        ))?;
        Ok(rows.first().filter(|r| r.keys > 0).map(|r| r.max_ms))
    }
}

impl Store for ClickHouseStore {
    fn commit(&mut self, batch: &BatchWrite<'_, '_>) -> Result<(), StoreError> {
        self.wait_committed()?;
        self.block_on(self.commit_async(batch, true))
    }

    /// Waits for the previous commit, prepares this one (recovery when needed, identity,
    /// encoding) and writes it on the runtime: rows, then the offsets row. The batch
    /// counts only once that row exists, as with [`Store::commit`]; a crash before leaves
    /// rows that recovery removes. Only with a runtime handle (the daemon's): a store with
    /// a runtime of its own commits at once.
    fn commit_started(&mut self, batch: &BatchWrite<'_, '_>) -> Result<(), StoreError> {
        self.wait_committed()?;
        let Rt::Handle(handle) = &self.inner.rt else {
            return self.block_on(self.commit_async(batch, true));
        };
        let Some(prepared) = self.block_on(self.prepare(batch))? else {
            return Ok(());
        };
        let prepared = Arc::new(prepared);
        let (store, p) = (self.clone(), Arc::clone(&prepared));
        let task = handle.spawn(async move { store.write_prepared(&p, true).await });
        *self.in_flight() = Some(InFlightCommit {
            prepared,
            task: Some(task),
        });
        Ok(())
    }

    /// A transient error keeps the commit for the next call (which recovers its partitions
    /// and writes it again); any other error drops it (its partitions stay dirty, so the
    /// next commit recovers them first).
    fn wait_committed(&mut self) -> Result<(), StoreError> {
        let Some(mut pending) = self.in_flight().take() else {
            return Ok(());
        };
        let result = match pending.task.take() {
            Some(task) => self.block_on(task).unwrap_or_else(|e| {
                Err(StoreError::Transient(format!(
                    "the commit task failed: {e}"
                )))
            }),
            None => self.block_on(self.retry_prepared(&pending.prepared)),
        };
        if matches!(&result, Err(e) if e.is_transient()) {
            *self.in_flight() = Some(pending);
        }
        result
    }

    fn keeps_raw_events(&self) -> bool {
        true
    }

    fn detection(&mut self) -> Option<&mut dyn super::DetectionStore> {
        Some(self)
    }

    fn history(&mut self) -> Option<&mut dyn super::HistoryStore> {
        Some(self)
    }

    fn position(&self, source: &str) -> Result<Option<Position>, StoreError> {
        self.block_on(self.position_async(source))
    }
}

/// The client's HTTP client, with `TCP_NODELAY`: an insert is a chunked request whose
/// small frames Nagle's algorithm would hold back until the server's delayed ACK (about
/// 40 ms per insert, measured here), and a connect timeout for unreachable servers.
impl OffsetStore for ClickHouseStore {
    fn recover(
        &self,
        source: &str,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, StoreError> {
        ClickHouseStore::recover(self, source, partitions)
    }
}

/// A commit whose rows are encoded, ready to be written (and written again after a failed
/// attempt).
struct Prepared {
    src: String,
    /// The next offset (Kafka) or batch count (files) of each topic partition.
    next: BTreeMap<TopicPartition, i64>,
    /// JSON of the position (files, stdin); empty for Kafka.
    position: String,
    encoded: rowbinary::EncodedBatch,
    offsets: RowBinary,
    events: usize,
    timings: CommitTimings,
}

/// The commit started by [`Store::commit_started`] and not yet waited for.
struct InFlightCommit {
    prepared: Arc<Prepared>,
    /// `None` once the task has failed: [`Store::wait_committed`] retries synchronously.
    task: Option<tokio::task::JoinHandle<Result<(), StoreError>>>,
}

/// Where one commit's time went, logged per batch at debug level (target
/// `keywatch::store::clickhouse`, message `batch stored`): the benchmarks read these lines.
#[derive(Debug, Default, Clone, Copy)]
struct CommitTimings {
    /// Recovering partitions this instance did not know or whose last commit failed.
    recover: Duration,
    /// Selecting and encoding the rows (RowBinary).
    encode: Duration,
    /// The four row inserts, sent at once: the slowest of them.
    rows: Duration,
    /// Each insert's own time: events, rollups, sources, keys.
    tables: [Duration; 4],
    /// The offsets row (the commit point).
    offsets: Duration,
    /// RowBinary bytes of the four row inserts (before compression).
    bytes: u64,
}

impl CommitTimings {
    fn log(&self, events: usize) {
        let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        tracing::debug!(
            events,
            bytes = self.bytes,
            recover_ms = ms(self.recover),
            encode_ms = ms(self.encode),
            rows_ms = ms(self.rows),
            events_ms = ms(self.tables[0]),
            rollups_ms = ms(self.tables[1]),
            sources_ms = ms(self.tables[2]),
            keys_ms = ms(self.tables[3]),
            offsets_ms = ms(self.offsets),
            "batch stored"
        );
    }
}

/// The topic of each event. Events carry their partition but not their topic
/// ([`super::Origin`]), so it is the topic of the checkpoint's entry for that partition; a
/// batch holding the same partition number of two topics cannot be told apart.
struct EventTopics<'s> {
    by_partition: HashMap<i32, Option<&'s str>>,
}

impl<'s> EventTopics<'s> {
    fn new(streams: &'s [(String, i32)]) -> Self {
        let mut by_partition = HashMap::new();
        for (t, p) in streams {
            by_partition
                .entry(*p)
                .and_modify(|known: &mut Option<&str>| {
                    if *known != Some(t.as_str()) {
                        *known = None;
                    }
                })
                .or_insert(Some(t.as_str()));
        }
        EventTopics { by_partition }
    }

    fn of(&self, src: &str, se: &StoredEvent<'_>) -> Result<&'s str, StoreError> {
        let p = se.origin.partition;
        match self.by_partition.get(&p) {
            Some(Some(t)) => Ok(t),
            Some(None) => Err(StoreError::Fatal(format!(
                "source {src}: partition {p} of several topics is in one batch, and events \
                 carry no topic: the ClickHouse store needs one topic per Kafka source (or \
                 the topic in store::Origin)"
            ))),
            None => Err(StoreError::Fatal(format!(
                "source {src}: an event of partition {p} is not covered by the batch's \
                 checkpoint"
            ))),
        }
    }
}

fn new_client(cfg: &ClickHouseConfig) -> Result<Client, StoreError> {
    use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector.set_connect_timeout(Some(cfg.insert_timeout));
    // Less than the server's keep-alive (3 s before 23.11, 10 s after).
    let mut builder = HyperClient::builder(hyper_util::rt::TokioExecutor::new());
    builder.pool_idle_timeout(Duration::from_secs(2));
    if !cfg.is_https() {
        return Ok(Client::with_http_client(builder.build(connector)));
    }
    connector.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(cfg)?)
        .https_only()
        .enable_http1()
        .wrap_connector(connector);
    Ok(Client::with_http_client(builder.build(https)))
}

/// The TLS client settings: the CAs of `ca_file`, or the public roots of webpki-roots
/// (Mozilla's list, built in: the same on every machine, unlike the system's store).
fn tls_config(cfg: &ClickHouseConfig) -> Result<rustls::ClientConfig, StoreError> {
    use hyper_rustls::ConfigBuilderExt as _;
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Fatal(format!("clickhouse TLS: {e}")))?;
    let Some(path) = &cfg.ca_file else {
        return Ok(builder.with_webpki_roots().with_no_client_auth());
    };
    let bad = |reason: String| {
        StoreError::Fatal(format!(
            "store.clickhouse.ca_file: {}: {reason}",
            path.display()
        ))
    };
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("not a PEM file of certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| bad(format!("a certificate rustls cannot use: {e}")))?;
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

fn own_runtime() -> Result<Runtime, StoreError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("keywatch-clickhouse")
        .enable_all()
        .build()
        .map_err(|e| StoreError::Fatal(format!("cannot start a runtime for ClickHouse: {e}")))
}

fn newer_schema(version: u32) -> StoreError {
    StoreError::Fatal(format!(
        "the ClickHouse database has schema version {version}, newer than this keywatch knows \
         ({SCHEMA_VERSION}); upgrade keywatch"
    ))
}

// `Outcome` indexes the rollups' outcome columns; keep them in step.
const _: () = assert!(Outcome::ALL.len() == schema::OUTCOME_COLUMNS.len());

// The pipeline moves the store to a blocking thread.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ClickHouseStore>();
};
