//! Every SQL statement keywatch sends to ClickHouse, built by pure functions.
//!
//! The store only sends what these functions return, so that [`super::catalog`] can hand
//! exactly the same statements to a current ClickHouse engine (chdb) in the tests. The SQL
//! is the common subset of ClickHouse 18.16 and current versions: no `DateTime64`, no
//! `LowCardinality`, one `JOIN` per `SELECT` with explicit `ANY` strictness, every result
//! column cast to the type keywatch reads. What differs by version (TTL, insert settings)
//! is decided by [`ServerFeatures`].
//!
//! On a cluster ([`ClusterLayout`]) every DDL statement runs `ON CLUSTER`; the four tables
//! of batch rows become a `Replicated*MergeTree` table `{name}_local` on every server
//! (one replica set per shard) under a `Distributed` table of the old name, sharded by
//! `cityHash64(key_id)`; the other tables (offsets, findings, notifications, versions)
//! are replicated whole to every server. Readers and writers name the same tables as on
//! one server; deletions, partitions and the TTL address the local tables.

use std::fmt::Write as _;

use crate::aggregate::LATENCY_BUCKETS;

/// The tables, in the order a batch writes them (`Offsets` last: it commits the batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Events,
    RollupMinute,
    KeySources,
    KeysSeen,
    Offsets,
    Findings,
    Notifications,
    SchemaMigrations,
    /// Version 2: one row per finding (dedup key) and raise, the latest state winning.
    FindingState,
    /// Version 2: one row per notification attempt.
    NotifyAttempts,
}

impl Table {
    pub fn suffix(self) -> &'static str {
        match self {
            Table::Events => "events",
            Table::RollupMinute => "rollup_minute",
            Table::KeySources => "key_sources",
            Table::KeysSeen => "keys_seen",
            Table::Offsets => "offsets",
            Table::Findings => "findings",
            Table::Notifications => "notifications",
            Table::SchemaMigrations => "schema_migrations",
            Table::FindingState => "finding_state",
            Table::NotifyAttempts => "notify_attempts",
        }
    }

    /// Tables whose rows carry a batch identity (`src`, `topic`, `part`, `batch_end`) and are
    /// removed when their batch was never committed.
    pub const BATCH_ROWS: [Table; 4] = [
        Table::Events,
        Table::RollupMinute,
        Table::KeySources,
        Table::KeysSeen,
    ];

    /// Whether the table is split by key over a cluster's shards (the batch rows); the
    /// others are small and every server holds all of them.
    pub fn is_sharded(self) -> bool {
        Self::BATCH_ROWS.contains(&self)
    }

    /// Columns and types of the tables keywatch inserts into, in RowBinary order.
    pub fn columns(self) -> Vec<(String, &'static str)> {
        let fixed: &[(&str, &'static str)] = match self {
            Table::Events => EVENT_COLUMNS,
            Table::RollupMinute => {
                let mut cols: Vec<(String, &'static str)> = vec![
                    ("key_id".into(), "String"),
                    ("minute".into(), "DateTime"),
                    ("requests".into(), "UInt64"),
                ];
                cols.extend(OUTCOME_COLUMNS.iter().map(|c| (c.to_string(), "UInt64")));
                cols.extend([
                    ("latency_count".into(), "UInt64"),
                    ("latency_sum_ms".into(), "Float64"),
                    ("latency_max_ms".into(), "Float64"),
                ]);
                cols.extend((0..LATENCY_BUCKETS).map(|i| (format!("lat_b{i}"), "UInt64")));
                cols.extend(BATCH_COLUMNS.iter().map(|(n, t)| (n.to_string(), *t)));
                return cols;
            }
            Table::KeySources => SOURCE_COLUMNS,
            Table::KeysSeen => KEY_COLUMNS,
            Table::Offsets => OFFSET_COLUMNS,
            Table::Findings => FINDING_COLUMNS,
            Table::Notifications => NOTIFICATION_COLUMNS,
            Table::SchemaMigrations => MIGRATION_COLUMNS,
            Table::FindingState => FINDING_STATE_COLUMNS,
            Table::NotifyAttempts => NOTIFY_ATTEMPT_COLUMNS,
        };
        fixed.iter().map(|(n, t)| (n.to_string(), *t)).collect()
    }
}

/// Outcome counters of a rollup, indexed like [`crate::event::Outcome::index`].
pub const OUTCOME_COLUMNS: [&str; 7] = [
    "ok",
    "invalid_key",
    "expired",
    "revoked",
    "forbidden",
    "rate_limited",
    "other",
];

const OUTCOME_ENUM: &str = "Enum8('ok' = 0, 'invalid_key' = 1, 'expired' = 2, 'revoked' = 3, \
                            'forbidden' = 4, 'rate_limited' = 5, 'other' = 6)";

/// The batch identity every event-derived row carries.
const BATCH_COLUMNS: &[(&str, &str)] = &[
    ("src", "String"),
    ("topic", "String"),
    ("part", "Int32"),
    ("batch_end", "Int64"),
];

const EVENT_COLUMNS: &[(&str, &str)] = &[
    // `ts` (seconds) partitions and expires rows; `ts_ms` keeps the millisecond (18.16 has
    // no DateTime64).
    ("ts", "DateTime"),
    ("ts_ms", "Int64"),
    ("key_id", "String"),
    ("key_hint", "String"),
    ("consumer", "String"),
    ("source_ip", "String"),
    ("user_agent", "String"),
    ("method", "String"),
    ("endpoint", "String"),
    ("status", "UInt16"),
    ("outcome", OUTCOME_ENUM),
    ("latency_ms", "Nullable(Float64)"),
    ("gateway", "String"),
    ("request_id", "String"),
    ("src", "String"),
    // Kafka topic and partition; empty and 0 for files and stdin.
    ("topic", "String"),
    ("part", "Int32"),
    // Kafka offset of the message (byte offset of the line for files).
    ("msg_offset", "Int64"),
    // Index of the event within its message.
    ("idx", "UInt32"),
    ("batch_end", "Int64"),
];

const SOURCE_COLUMNS: &[(&str, &str)] = &[
    ("key_id", "String"),
    ("ip", "String"),
    ("user_agent", "String"),
    ("endpoint", "String"),
    ("gateway", "String"),
    ("first_seen_ms", "Int64"),
    ("last_seen_ms", "Int64"),
    ("requests", "UInt64"),
    ("failures", "UInt64"),
    ("src", "String"),
    ("topic", "String"),
    ("part", "Int32"),
    ("batch_end", "Int64"),
];

const KEY_COLUMNS: &[(&str, &str)] = &[
    ("key_id", "String"),
    ("hint", "String"),
    ("consumer", "String"),
    ("first_seen_ms", "Int64"),
    ("last_seen_ms", "Int64"),
    ("src", "String"),
    ("topic", "String"),
    ("part", "Int32"),
    ("batch_end", "Int64"),
];

const OFFSET_COLUMNS: &[(&str, &str)] = &[
    ("src", "String"),
    // Kafka topic; empty for files and stdin.
    ("topic", "String"),
    ("part", "Int32"),
    // Kafka: the next offset to read. Files: the number of batches committed so far.
    ("next_offset", "Int64"),
    ("batch_end", "Int64"),
    // Files and stdin: the JSON of the source position (`source::Position`).
    ("position", "String"),
    ("written_at", "DateTime"),
];

const FINDING_COLUMNS: &[(&str, &str)] = &[
    ("dedup_key", "String"),
    ("kind", "String"),
    ("key_id", "String"),
    ("owner", "String"),
    ("severity", "String"),
    ("at", "DateTime"),
    ("summary", "String"),
    ("evidence", "String"),
];

const NOTIFICATION_COLUMNS: &[(&str, &str)] = &[
    ("id", "String"),
    ("finding_key", "String"),
    ("channel", "String"),
    // Redacted before it is stored.
    ("recipient", "String"),
    ("step", "UInt32"),
    ("attempt", "UInt32"),
    ("outcome", "String"),
    ("error", "String"),
    ("at", "DateTime"),
];

/// Version 2's findings (`store::clickhouse::detection`): the version 1 `findings` table
/// has second times and no first time or count, and 18.16 cannot add columns idempotently
/// (no `ADD COLUMN IF NOT EXISTS`), so the state lives in a new table. Every raise inserts
/// the fact's whole state; `raised` (the count) is the version that wins.
const FINDING_STATE_COLUMNS: &[(&str, &str)] = &[
    ("dedup_key", "String"),
    ("kind", "String"),
    ("key_id", "String"),
    // Empty when the registry knows no owner.
    ("owner", "String"),
    ("severity", "String"),
    ("first_at_ms", "Int64"),
    ("last_at_ms", "Int64"),
    ("raised", "UInt64"),
    ("summary", "String"),
    ("evidence", "String"),
    // The instance that first stored the fact: two instances racing on a new fact both
    // insert it, and only the smallest id among the rows tells it as new.
    ("claimed_by", "String"),
    // `last_at_ms` as a DateTime, for dashboards.
    ("at", "DateTime"),
];

/// Version 2's notification log (`notify::AttemptRecord`), secrets removed before insert.
const NOTIFY_ATTEMPT_COLUMNS: &[(&str, &str)] = &[
    ("message_id", "String"),
    ("recipient", "String"),
    ("receiver", "String"),
    ("channel", "String"),
    ("channel_type", "String"),
    ("target", "String"),
    ("kinds", "String"),
    ("severity", "String"),
    ("created_ms", "Int64"),
    ("attempt", "UInt32"),
    ("started_ms", "Int64"),
    ("finished_ms", "Int64"),
    ("outcome", "String"),
    ("detail", "String"),
    ("at", "DateTime"),
];

const MIGRATION_COLUMNS: &[(&str, &str)] = &[
    ("version", "UInt32"),
    ("applied_at", "DateTime"),
    ("keywatch", "String"),
];

/// What the server can do, from `SELECT version()` and `system.settings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFeatures {
    pub version: String,
    /// `TTL` clauses on MergeTree tables (19.6 and later).
    pub ttl: bool,
    /// Settings sent with every insert, where the server knows them: no asynchronous
    /// inserts (an acknowledged insert must be written, or offsets could land before
    /// their rows), no limit on day partitions per insert (replays of old logs).
    pub insert_settings: Vec<(&'static str, &'static str)>,
}

/// Settings keywatch sets on inserts when the server has them.
pub const WANTED_INSERT_SETTINGS: &[(&str, &str)] = &[
    ("async_insert", "0"),
    ("max_partitions_per_insert_block", "0"),
];

/// `major.minor` of a `version()` string (`18.16.1`, `24.8.4.13`).
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.trim().split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

impl ServerFeatures {
    /// `known_settings`: which of [`WANTED_INSERT_SETTINGS`] the server lists.
    pub fn new(version: &str, known_settings: &[String]) -> Self {
        let v = parse_version(version).unwrap_or((0, 0));
        ServerFeatures {
            version: version.trim().to_owned(),
            ttl: v >= (19, 6),
            insert_settings: WANTED_INSERT_SETTINGS
                .iter()
                .filter(|(n, _)| known_settings.iter().any(|k| k == n))
                .copied()
                .collect(),
        }
    }

    /// A current server (what the chdb check runs against).
    pub fn current() -> Self {
        let all: Vec<String> = WANTED_INSERT_SETTINGS
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        Self::new("26.9", &all)
    }
}

/// A ClickHouse string literal.
pub fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Builds the statements for one database and table prefix (both validated identifiers).
#[derive(Debug, Clone)]
pub struct Sql {
    pub database: String,
    pub prefix: String,
    /// `None`: one server.
    pub cluster: Option<ClusterLayout>,
}

/// Where the tables live on a cluster (from `store.clickhouse.cluster`, validated: no
/// quotes in the paths). `{database}` and `{table}` in the paths are filled in here, the
/// other macros by each server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterLayout {
    pub name: String,
    pub shard_path: String,
    pub replica: String,
    pub global_path: String,
    pub global_replica: String,
}

/// One migration: statements that are all idempotent (`IF NOT EXISTS`), so that two
/// instances migrating at once, or a migration interrupted half-way, are harmless.
/// Rule for later migrations: only statements that can run twice (`ADD COLUMN IF NOT
/// EXISTS`, `CREATE ... IF NOT EXISTS`, new tables instead of renames).
pub type Migration = Vec<String>;

impl Sql {
    pub fn new(database: &str, prefix: &str) -> Self {
        Sql {
            database: database.to_owned(),
            prefix: prefix.to_owned(),
            cluster: None,
        }
    }

    /// The statements for a cluster.
    pub fn on(mut self, cluster: ClusterLayout) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// ` ON CLUSTER name`, or nothing on one server.
    fn on_cluster(&self) -> String {
        self.cluster
            .as_ref()
            .map(|c| format!(" ON CLUSTER {}", c.name))
            .unwrap_or_default()
    }

    /// Bare name of the table that holds the rows on each server: `{name}_local` for
    /// sharded tables on a cluster, else the table itself.
    pub fn local_name(&self, t: Table) -> String {
        if self.cluster.is_some() && t.is_sharded() {
            format!("{}_local", self.name(t))
        } else {
            self.name(t)
        }
    }

    /// Qualified [`Self::local_name`].
    pub fn local(&self, t: Table) -> String {
        format!("{}.{}", self.database, self.local_name(t))
    }

    /// A system table on one server, or on one replica of every shard of the cluster.
    fn system(&self, table: &str) -> String {
        match &self.cluster {
            Some(c) => format!("cluster({}, system, {table})", lit(&c.name)),
            None => format!("system.{table}"),
        }
    }

    /// The engine clause: `base(args)` on one server, `Replicated{base}(path, replica,
    /// args)` on a cluster.
    fn engine(&self, t: Table, base: &str, args: &str) -> String {
        let Some(c) = &self.cluster else {
            return if args.is_empty() {
                base.to_owned()
            } else {
                format!("{base}({args})")
            };
        };
        let (path, replica) = if t.is_sharded() {
            (&c.shard_path, &c.replica)
        } else {
            (&c.global_path, &c.global_replica)
        };
        let path = path
            .replace("{database}", &self.database)
            .replace("{table}", &self.local_name(t));
        let args = if args.is_empty() {
            String::new()
        } else {
            format!(", {args}")
        };
        format!("Replicated{base}({}, {}{args})", lit(&path), lit(replica))
    }

    /// `CREATE TABLE` of one table (`rest`: partitioning, ordering, TTL): on a cluster,
    /// the local table and, for sharded tables, the Distributed table over it.
    fn create_table(&self, t: Table, base: &str, args: &str, rest: &str) -> Vec<String> {
        let on = self.on_cluster();
        let mut out = vec![format!(
            "CREATE TABLE IF NOT EXISTS {}{on} ({}) ENGINE = {} {rest}",
            self.local(t),
            column_defs(t),
            self.engine(t, base, args)
        )];
        if let (Some(c), true) = (&self.cluster, t.is_sharded()) {
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {}{on} ({}) ENGINE = Distributed({}, {}, {}, \
                 cityHash64(key_id))",
                self.table(t),
                column_defs(t),
                c.name,
                self.database,
                self.local_name(t)
            ));
        }
        out
    }

    /// Bare table name (`keywatch_events`).
    pub fn name(&self, t: Table) -> String {
        format!("{}{}", self.prefix, t.suffix())
    }

    /// Qualified table name (`keywatch.keywatch_events`).
    pub fn table(&self, t: Table) -> String {
        format!("{}.{}{}", self.database, self.prefix, t.suffix())
    }

    fn view(&self, name: &str) -> String {
        format!("{}.{}{}", self.database, self.prefix, name)
    }

    pub fn version() -> &'static str {
        "SELECT version()"
    }

    pub fn known_settings() -> String {
        let names: Vec<String> = WANTED_INSERT_SETTINGS.iter().map(|(n, _)| lit(n)).collect();
        format!(
            "SELECT name FROM system.settings WHERE name IN ({})",
            names.join(", ")
        )
    }

    /// `shard, replicas` of a cluster of the server's `remote_servers`.
    pub fn cluster_shards(name: &str) -> String {
        format!(
            "SELECT toUInt32(shard_num) AS shard, toUInt64(count()) AS replicas FROM \
             system.clusters WHERE cluster = {} GROUP BY shard_num ORDER BY shard_num",
            lit(name)
        )
    }

    pub fn database_exists(&self) -> String {
        format!(
            "SELECT toUInt64(count()) FROM system.databases WHERE name = {}",
            lit(&self.database)
        )
    }

    pub fn create_database(&self) -> String {
        format!(
            "CREATE DATABASE IF NOT EXISTS {}{}",
            self.database,
            self.on_cluster()
        )
    }

    /// Whether the migrations table exists on this server (1) or not (0).
    pub fn migrations_table_exists(&self) -> String {
        format!(
            "SELECT toUInt64(count()) FROM system.tables WHERE database = {} AND name = {}",
            lit(&self.database),
            lit(&self.name(Table::SchemaMigrations))
        )
    }

    pub fn create_migrations_table(&self) -> String {
        self.create_table(
            Table::SchemaMigrations,
            "ReplacingMergeTree",
            "",
            "ORDER BY version",
        )
        .remove(0)
    }

    pub fn schema_version(&self) -> String {
        format!(
            "SELECT toUInt32(max(version)) FROM {}",
            self.table(Table::SchemaMigrations)
        )
    }

    pub fn record_migration(&self, version: u32, keywatch: &str) -> String {
        format!(
            "INSERT INTO {} (version, applied_at, keywatch) VALUES ({version}, now(), {})",
            self.table(Table::SchemaMigrations),
            lit(keywatch)
        )
    }

    /// Entry `i` takes the schema from version `i` to `i + 1`. `retention_days` (0: none)
    /// sets the TTL of raw events on servers that have TTL.
    pub fn migrations(&self, features: &ServerFeatures, retention_days: u32) -> Vec<Migration> {
        let ttl = if features.ttl && retention_days > 0 {
            format!(" TTL {}", ttl_expr(retention_days))
        } else {
            String::new()
        };
        let t = |t: Table| self.table(t);
        let on = self.on_cluster();
        let mut v1 = Vec::new();
        v1.extend(self.create_table(
            Table::Events,
            "MergeTree",
            "",
            &format!("PARTITION BY toYYYYMMDD(ts) ORDER BY (key_id, ts){ttl}"),
        ));
        v1.extend(self.create_table(
            Table::RollupMinute,
            "MergeTree",
            "",
            "PARTITION BY toYYYYMM(minute) ORDER BY (key_id, minute)",
        ));
        v1.extend(self.create_table(
            Table::KeySources,
            "MergeTree",
            "",
            "ORDER BY (key_id, ip, user_agent, endpoint, gateway)",
        ));
        v1.extend(self.create_table(Table::KeysSeen, "MergeTree", "", "ORDER BY key_id"));
        // ReplacingMergeTree keeps the table small; readers take the highest
        // next_offset per partition, so unmerged rows never matter.
        v1.extend(self.create_table(
            Table::Offsets,
            "ReplacingMergeTree",
            "next_offset",
            "ORDER BY (src, topic, part)",
        ));
        v1.extend(self.create_table(
            Table::Findings,
            "ReplacingMergeTree",
            "at",
            "ORDER BY dedup_key",
        ));
        v1.extend(self.create_table(
            Table::Notifications,
            "MergeTree",
            "",
            "PARTITION BY toYYYYMM(at) ORDER BY (finding_key, at)",
        ));
        // Views for dashboards: the per-batch rows summed at query time (on a cluster,
        // over the Distributed tables: the whole cluster).
        v1.extend([
            format!(
                "CREATE VIEW IF NOT EXISTS {}{on} AS SELECT key_id, minute, {} FROM {} \
                 GROUP BY key_id, minute",
                self.view("rollup_minute_v"),
                rollup_sums(""),
                t(Table::RollupMinute)
            ),
            format!(
                "CREATE VIEW IF NOT EXISTS {}{on} AS SELECT key_id, ip, user_agent, endpoint, \
                 gateway, min(first_seen_ms) AS first_seen_ms, max(last_seen_ms) AS \
                 last_seen_ms, sum(requests) AS requests, sum(failures) AS failures FROM {} \
                 GROUP BY key_id, ip, user_agent, endpoint, gateway",
                self.view("key_sources_v"),
                t(Table::KeySources)
            ),
            format!(
                "CREATE VIEW IF NOT EXISTS {}{on} AS SELECT key_id, {} FROM {} GROUP BY key_id",
                self.view("keys_v"),
                key_fields("key_"),
                t(Table::KeysSeen)
            ),
        ]);
        // Version 2: findings with first/last time in ms and a count, and the attempts of
        // the notifier with every field. The version 1 `findings` (each fact's latest
        // raise) and `notifications` (one row per finding told) tables are still written,
        // for the dashboards.
        let mut v2 = self.create_table(
            Table::FindingState,
            "ReplacingMergeTree",
            "raised",
            "ORDER BY dedup_key",
        );
        // A retried insert whose first answer was lost lands twice; merges fold it.
        v2.extend(self.create_table(
            Table::NotifyAttempts,
            "ReplacingMergeTree",
            "",
            "PARTITION BY toYYYYMM(at) ORDER BY (message_id, attempt, started_ms, outcome)",
        ));
        vec![v1, v2]
    }

    /// The RowBinary insert of a table, with every column named.
    pub fn insert(&self, t: Table) -> String {
        let cols: Vec<String> = t.columns().into_iter().map(|(n, _)| n).collect();
        format!(
            "INSERT INTO {} ({}) FORMAT RowBinary",
            self.table(t),
            cols.join(", ")
        )
    }

    /// Committed offsets of a source: `topic, part, next_offset, position`.
    pub fn read_offsets(&self, src: &str) -> String {
        format!(
            "SELECT topic, part, toInt64(max(next_offset)) AS next, \
             argMax(position, next_offset) AS p FROM {} WHERE src = {} \
             GROUP BY topic, part ORDER BY topic, part",
            self.table(Table::Offsets),
            lit(src)
        )
    }

    /// Selects the rows of batches not committed: per topic partition, `batch_end` at or
    /// after the committed next offset (`None`: nothing committed, every row of it).
    pub fn uncommitted_filter(src: &str, parts: &[(&str, i32, Option<i64>)]) -> String {
        let mut conds = Vec::with_capacity(parts.len());
        for (topic, part, next) in parts {
            let topic = lit(topic);
            conds.push(match next {
                Some(n) => format!("(topic = {topic} AND part = {part} AND batch_end >= {n})"),
                None => format!("(topic = {topic} AND part = {part})"),
            });
        }
        format!("src = {} AND ({})", lit(src), conds.join(" OR "))
    }

    pub fn count_where(&self, t: Table, filter: &str) -> String {
        format!(
            "SELECT toUInt64(count()) FROM {} WHERE {filter}",
            self.table(t)
        )
    }

    /// A mutation (18.16 and later); [`Self::pending_mutations`] says when it is done. On
    /// a cluster it runs `ON CLUSTER`: one replica of each shard registers it.
    pub fn delete_where(&self, t: Table, filter: &str) -> String {
        format!(
            "ALTER TABLE {}{} DELETE WHERE {filter}",
            self.local(t),
            self.on_cluster()
        )
    }

    /// [`Self::delete_where`] sent to this server alone. On a cluster of one shard that is
    /// enough: the table is replicated, and a mutation registered on one replica is
    /// registered for all (in ZooKeeper, not through the distributed DDL queue, so a
    /// replica that is down, or whose DDL worker has stopped, holds nothing back).
    pub fn delete_where_here(&self, t: Table, filter: &str) -> String {
        format!("ALTER TABLE {} DELETE WHERE {filter}", self.local(t))
    }

    /// Statements that write to this database and are running now (inserts, deletions),
    /// whoever sent them: `query_id`s to wait for before recovering.
    pub fn running_writes(&self) -> String {
        let db = &self.database;
        format!(
            "SELECT query_id FROM system.processes WHERE startsWith(query, {}) \
             OR startsWith(query, {})",
            lit(&format!("INSERT INTO {db}.")),
            lit(&format!("ALTER TABLE {db}."))
        )
    }

    /// How many of `query_ids` still run.
    pub fn still_running(query_ids: &[String]) -> String {
        let ids: Vec<String> = query_ids.iter().map(|q| lit(q)).collect();
        format!(
            "SELECT toUInt64(count()) FROM system.processes WHERE query_id IN ({})",
            if ids.is_empty() {
                "''".to_owned()
            } else {
                ids.join(", ")
            }
        )
    }

    pub fn pending_mutations(&self) -> String {
        let names: Vec<String> = Table::BATCH_ROWS
            .iter()
            .map(|t| lit(&self.local_name(*t)))
            .collect();
        format!(
            "SELECT toUInt64(count()) FROM {} WHERE database = {} AND table IN ({}) \
             AND is_done = 0",
            self.system("mutations"),
            lit(&self.database),
            names.join(", ")
        )
    }

    /// Per key over rollups with `minute >= since_s`: see [`super::UsageRow`] for the
    /// columns. 18.16 allows one JOIN per SELECT, hence the nesting; current versions
    /// want an alias on every joined subquery.
    pub fn key_usage(&self, since_s: Option<u32>) -> String {
        let filter = since_s
            .map(|s| format!(" WHERE minute >= toDateTime({s})"))
            .unwrap_or_default();
        let mut sums = String::new();
        let _ = write!(sums, "toUInt64(sum(requests)) AS r_requests");
        for c in OUTCOME_COLUMNS {
            let _ = write!(sums, ", toUInt64(sum({c})) AS r_{c}");
        }
        let _ = write!(
            sums,
            ", toUInt64(sum(latency_count)) AS r_latency_count, \
             toFloat64(sum(latency_sum_ms)) AS r_latency_sum_ms, \
             toFloat64(max(latency_max_ms)) AS r_latency_max_ms"
        );
        for i in 0..LATENCY_BUCKETS {
            let _ = write!(sums, ", toUInt64(sum(lat_b{i})) AS r_lat_b{i}");
        }
        let mut outer =
            String::from("key_id, k_hint, k_consumer, r_first_minute, r_last_minute, r_requests");
        for c in OUTCOME_COLUMNS {
            let _ = write!(outer, ", r_{c}");
        }
        outer.push_str(", r_latency_count, r_latency_sum_ms, r_latency_max_ms");
        for i in 0..LATENCY_BUCKETS {
            let _ = write!(outer, ", r_lat_b{i}");
        }
        format!(
            "SELECT {outer}, s_sources, k_first_seen_ms, k_last_seen_ms, k_found FROM (\
               SELECT * FROM (\
                 SELECT key_id, toInt64(min(minute)) AS r_first_minute, \
                   toInt64(max(minute)) AS r_last_minute, {sums} \
                 FROM {rollups}{filter} GROUP BY key_id\
               ) AS r ANY LEFT JOIN (\
                 SELECT key_id, {keys}, toUInt8(1) AS k_found FROM {keys_table} GROUP BY key_id\
               ) AS k USING key_id\
             ) AS rk ANY LEFT JOIN (\
               SELECT key_id, toUInt64(count()) AS s_sources FROM (\
                 SELECT key_id FROM {sources} GROUP BY key_id, ip, user_agent, endpoint, gateway\
               ) AS d GROUP BY key_id\
             ) AS s USING key_id \
             ORDER BY r_requests DESC, key_id",
            rollups = self.table(Table::RollupMinute),
            keys = key_fields("k_"),
            keys_table = self.table(Table::KeysSeen),
            sources = self.table(Table::KeySources),
        )
    }

    /// The sources of one key, most recently seen first.
    pub fn key_sources(&self, key_id: &str) -> String {
        format!(
            "SELECT key_id, ip, user_agent, endpoint, gateway, \
             toInt64(min(first_seen_ms)) AS f, toInt64(max(last_seen_ms)) AS l, \
             toUInt64(sum(requests)) AS r, toUInt64(sum(failures)) AS x \
             FROM {} WHERE key_id = {} GROUP BY key_id, ip, user_agent, endpoint, gateway \
             ORDER BY l DESC, r DESC, ip, user_agent, endpoint, gateway",
            self.table(Table::KeySources),
            lit(key_id)
        )
    }

    /// Requests in rollups, rows in events, requests in sources, distinct keys.
    pub fn totals(&self) -> String {
        format!(
            "SELECT (SELECT toUInt64(sum(requests)) FROM {}), (SELECT toUInt64(count()) FROM {}), \
             (SELECT toUInt64(sum(requests)) FROM {}), (SELECT toUInt64(uniqExact(key_id)) FROM {})",
            self.table(Table::RollupMinute),
            self.table(Table::Events),
            self.table(Table::KeySources),
            self.table(Table::KeysSeen)
        )
    }

    /// `max(last_seen_ms), count()` over keys seen.
    pub fn latest_event(&self) -> String {
        format!(
            "SELECT toInt64(max(last_seen_ms)), toUInt64(count()) FROM {}",
            self.table(Table::KeysSeen)
        )
    }

    /// The engine clause of the events table (it holds the TTL).
    pub fn events_engine(&self) -> String {
        format!(
            "SELECT engine_full FROM system.tables WHERE database = {} AND name = {}",
            lit(&self.database),
            lit(&self.local_name(Table::Events))
        )
    }

    pub fn modify_ttl(&self, retention_days: u32) -> String {
        format!(
            "ALTER TABLE {}{} MODIFY TTL {}",
            self.local(Table::Events),
            self.on_cluster(),
            ttl_expr(retention_days)
        )
    }

    /// Day partitions (`YYYYMMDD`) of the events table, for servers without TTL.
    pub fn event_partitions(&self) -> String {
        format!(
            "SELECT DISTINCT partition FROM {} WHERE database = {} AND table = {} \
             AND active ORDER BY partition",
            self.system("parts"),
            lit(&self.database),
            lit(&self.local_name(Table::Events))
        )
    }

    pub fn drop_event_partition(&self, yyyymmdd: u32) -> String {
        format!(
            "ALTER TABLE {}{} DROP PARTITION {yyyymmdd}",
            self.local(Table::Events),
            self.on_cluster()
        )
    }
}

fn ttl_expr(days: u32) -> String {
    format!("ts + INTERVAL {days} DAY")
}

/// How `engine_full` shows the TTL keywatch sets (current versions normalize it).
pub fn ttl_in_engine(days: u32) -> String {
    format!("TTL ts + toIntervalDay({days})")
}

fn column_defs(t: Table) -> String {
    t.columns()
        .iter()
        .map(|(n, ty)| format!("{n} {ty}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sums of a rollup's counters, aliased `{prefix}{column}`.
fn rollup_sums(prefix: &str) -> String {
    let mut s = format!("sum(requests) AS {prefix}requests");
    for c in OUTCOME_COLUMNS {
        let _ = write!(s, ", sum({c}) AS {prefix}{c}");
    }
    let _ = write!(
        s,
        ", sum(latency_count) AS {prefix}latency_count, sum(latency_sum_ms) AS \
         {prefix}latency_sum_ms, max(latency_max_ms) AS {prefix}latency_max_ms"
    );
    for i in 0..LATENCY_BUCKETS {
        let _ = write!(s, ", sum(lat_b{i}) AS {prefix}lat_b{i}");
    }
    s
}

/// What keywatch knows of a key over all its batches: the first hint ever seen, the latest
/// consumer, first and last use (empty strings for "unknown"). The aliases need a prefix:
/// ClickHouse substitutes aliases inside other expressions of the same SELECT.
fn key_fields(prefix: &str) -> String {
    format!(
        "argMinIf(hint, first_seen_ms, hint != '') AS {prefix}hint, \
         argMaxIf(consumer, last_seen_ms, consumer != '') AS {prefix}consumer, \
         toInt64(min(first_seen_ms)) AS {prefix}first_seen_ms, \
         toInt64(max(last_seen_ms)) AS {prefix}last_seen_ms"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_decide_features() {
        assert_eq!(parse_version("18.16.1"), Some((18, 16)));
        assert_eq!(parse_version("24.8.4.13"), Some((24, 8)));
        let old = ServerFeatures::new("18.16.1", &[]);
        assert!(!old.ttl);
        assert!(old.insert_settings.is_empty());
        assert!(ServerFeatures::new("19.6.2", &[]).ttl);
        assert!(!ServerFeatures::new("19.5.9", &[]).ttl);
        let new = ServerFeatures::new("24.3.1", &["async_insert".into()]);
        assert_eq!(new.insert_settings, vec![("async_insert", "0")]);
    }

    #[test]
    fn literals_are_escaped() {
        assert_eq!(lit("a'b\\c\td"), "'a\\'b\\\\c\\td'");
    }

    #[test]
    fn ttl_only_where_supported() {
        let sql = Sql::new("kw", "p_");
        let old = sql.migrations(&ServerFeatures::new("18.16.1", &[]), 30);
        assert!(!old[0][0].contains("TTL"));
        let new = sql.migrations(&ServerFeatures::current(), 30);
        assert!(
            new[0][0].contains("TTL ts + INTERVAL 30 DAY"),
            "{}",
            new[0][0]
        );
        let never = sql.migrations(&ServerFeatures::current(), 0);
        assert!(!never[0][0].contains("TTL"));
    }

    #[test]
    fn one_server_statements_are_unchanged_and_a_cluster_replicates() {
        let one = Sql::new("kw", "p_");
        let m = one.migrations(&ServerFeatures::new("18.16.1", &[]), 30);
        assert!(
            m[0][0].starts_with("CREATE TABLE IF NOT EXISTS kw.p_events (ts DateTime, ts_ms Int64")
        );
        assert!(m[0][0]
            .ends_with("ENGINE = MergeTree PARTITION BY toYYYYMMDD(ts) ORDER BY (key_id, ts)"));
        assert_eq!(m[0].len() + m[1].len(), 12);
        let c = Sql::new("kw", "p_").on(ClusterLayout {
            name: "main".into(),
            shard_path: "/ch/{shard}/{database}/{table}".into(),
            replica: "{replica}".into(),
            global_path: "/ch/all/{database}/{table}".into(),
            global_replica: "{shard}-{replica}".into(),
        });
        let m = c.migrations(&ServerFeatures::new("18.16.1", &[]), 30);
        assert!(
            m[0][0].contains("kw.p_events_local ON CLUSTER main (")
                && m[0][0].contains(
                    "ENGINE = ReplicatedMergeTree('/ch/{shard}/kw/p_events_local', '{replica}')"
                ),
            "{}",
            m[0][0]
        );
        assert!(m[0][1].contains("kw.p_events ON CLUSTER main (ts DateTime"));
        assert!(
            m[0][1].ends_with("ENGINE = Distributed(main, kw, p_events_local, cityHash64(key_id))")
        );
        let offsets = m[0].iter().find(|s| s.contains("p_offsets")).unwrap();
        assert!(offsets.contains(
            "ReplicatedReplacingMergeTree('/ch/all/kw/p_offsets', '{shard}-{replica}', next_offset)"
        ), "{offsets}");
        assert_eq!(
            c.delete_where(Table::KeysSeen, "src = 'a'"),
            "ALTER TABLE kw.p_keys_seen_local ON CLUSTER main DELETE WHERE src = 'a'"
        );
        assert_eq!(
            c.delete_where_here(Table::KeysSeen, "src = 'a'"),
            "ALTER TABLE kw.p_keys_seen_local DELETE WHERE src = 'a'"
        );
        assert!(c
            .pending_mutations()
            .contains("FROM cluster('main', system, mutations)"));
        assert_eq!(c.insert(Table::Events), one.insert(Table::Events));
    }

    #[test]
    fn uncommitted_filter_per_partition() {
        assert_eq!(
            Sql::uncommitted_filter("kafka:g", &[("t", 0, Some(10)), ("t", 3, None)]),
            "src = 'kafka:g' AND ((topic = 't' AND part = 0 AND batch_end >= 10) OR \
             (topic = 't' AND part = 3))"
        );
    }
}
