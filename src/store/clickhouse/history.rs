//! Stored usage read back for the anomaly models' warm-up ([`HistoryStore`]).
//!
//! The rows of a batch are summed at query time, like the `rollup_minute_v` and
//! `key_sources_v` views do; the filter on `minute` comes before the `GROUP BY` so that
//! only the warm-up window is aggregated (a view would aggregate everything first on
//! servers that do not push predicates into views, 18.16 among them). Rows are streamed
//! (RowBinary cursor) to the caller one at a time. SQL for 18.16 and current servers; every
//! statement is in the catalog (`catalog.rs`) that `tests/chdb` runs on both.
//!
//! In a consumer group, a read may be narrowed to Kafka topic partitions: every row carries
//! its batch's `topic` and `part`, so the filter is on the rows themselves (no subquery,
//! so on a cluster it reads the Distributed tables like the other reads: the whole
//! cluster).
//!
//! Rows of a batch that was written but never committed (a crash between the rows and the
//! `offsets` row) are only removed when its partition is recovered; a warm-up that runs
//! before may count them once. The baselines are statistics over weeks, so that is harmless.

use std::fmt::Write;

use ::clickhouse::Row;
use serde::Deserialize;

use super::error::Phase;
use super::rowbinary::seconds;
use super::schema::{lit, Sql, Table, OUTCOME_COLUMNS};
use super::{ClickHouseStore, REPORT_TIMEOUT};
use crate::aggregate::{Rollup, LATENCY_BUCKETS};
use crate::source::kafka::TopicPartition;
use crate::store::{history_cut, HistoryRead, HistoryStore, SourceHistoryRow, StoreError};

/// ` AND (rows of these topic partitions)`; nothing for `None` (every row), a false
/// condition for none.
pub fn partition_filter(partitions: Option<&[TopicPartition]>) -> String {
    let Some(partitions) = partitions else {
        return String::new();
    };
    if partitions.is_empty() {
        return " AND 0".to_owned();
    }
    let mut topics: Vec<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
    topics.sort_unstable();
    topics.dedup();
    let conds: Vec<String> = topics
        .iter()
        .map(|t| {
            let mut parts: Vec<i32> = partitions
                .iter()
                .filter(|(pt, _)| pt == t)
                .map(|(_, p)| *p)
                .collect();
            parts.sort_unstable();
            let parts: Vec<String> = parts.iter().map(i32::to_string).collect();
            format!("(topic = {} AND part IN ({}))", lit(t), parts.join(", "))
        })
        .collect();
    format!(" AND ({})", conds.join(" OR "))
}

/// The latest stored minute (Unix s; 0 when nothing is stored).
pub fn latest_minute(sql: &Sql) -> String {
    format!(
        "SELECT toInt64(toUInt32(max(minute))) AS m, toUInt64(count()) AS n FROM {}",
        sql.table(Table::RollupMinute)
    )
}

/// Rows per minute from `since_s` on, newest first: `minute (Unix s), rows`; `filter` from
/// [`partition_filter`].
pub fn rollup_minutes(sql: &Sql, since_s: u32, filter: &str) -> String {
    format!(
        "SELECT toInt64(toUInt32(minute)) AS m, toUInt64(uniqExact(key_id)) AS n FROM {} \
         WHERE minute >= toDateTime({since_s}){filter} GROUP BY minute ORDER BY minute DESC",
        sql.table(Table::RollupMinute)
    )
}

/// Per-minute rollups from `since_s` on, by key then minute, at most `limit`; `filter` from
/// [`partition_filter`].
pub fn rollup_history(sql: &Sql, since_s: u32, limit: u64, filter: &str) -> String {
    let mut sums = String::from("toUInt64(sum(requests))");
    for c in OUTCOME_COLUMNS {
        let _ = write!(sums, ", toUInt64(sum({c}))");
    }
    sums.push_str(
        ", toUInt64(sum(latency_count)), toFloat64(sum(latency_sum_ms)), \
         toFloat64(max(latency_max_ms))",
    );
    for i in 0..LATENCY_BUCKETS {
        let _ = write!(sums, ", toUInt64(sum(lat_b{i}))");
    }
    format!(
        "SELECT key_id, toInt64(toUInt32(minute)) AS m, {sums} FROM {} \
         WHERE minute >= toDateTime({since_s}){filter} GROUP BY key_id, minute \
         ORDER BY key_id, minute LIMIT {limit}",
        sql.table(Table::RollupMinute)
    )
}

/// Every key's sources (gateways merged), the most recently seen first, at most `limit`;
/// `filter` from [`partition_filter`].
pub fn source_history(sql: &Sql, limit: u64, filter: &str) -> String {
    format!(
        "SELECT key_id, ip, user_agent, endpoint, toInt64(min(first_seen_ms)) AS f, \
         toInt64(max(last_seen_ms)) AS l FROM {} WHERE 1{filter} \
         GROUP BY key_id, ip, user_agent, endpoint \
         ORDER BY l DESC, key_id, ip, user_agent, endpoint LIMIT {limit}",
        sql.table(Table::KeySources)
    )
}

/// The keys of the rollups from `since_s` on, with the topic partition that stored them:
/// `key_id, topic, part`; `filter` from [`partition_filter`].
pub fn key_partitions(sql: &Sql, since_s: u32, filter: &str) -> String {
    format!(
        "SELECT key_id, topic, part FROM {} WHERE minute >= toDateTime({since_s}){filter} \
         GROUP BY key_id, topic, part ORDER BY key_id, topic, part",
        sql.table(Table::RollupMinute)
    )
}

#[derive(Row, Deserialize)]
struct KeyPartitionRow {
    key_id: String,
    topic: String,
    part: i32,
}

#[derive(Row, Deserialize)]
struct MinuteCount {
    minute_s: i64,
    rows: u64,
}

#[derive(Row, Deserialize)]
struct RollupRow {
    key_id: String,
    minute_s: i64,
    requests: u64,
    outcomes: [u64; 7],
    latency_count: u64,
    latency_sum_ms: f64,
    latency_max_ms: f64,
    latency_buckets: [u64; LATENCY_BUCKETS],
}

#[derive(Row, Deserialize)]
struct SourceRow {
    key_id: String,
    ip: String,
    user_agent: String,
    endpoint: String,
    first_seen_ms: i64,
    last_seen_ms: i64,
}

impl ClickHouseStore {
    async fn rollup_history_async(
        &self,
        window_ms: i64,
        max_rows: u64,
        partitions: Option<&[TopicPartition]>,
        f: &mut dyn FnMut(&str, i64, &Rollup),
    ) -> Result<HistoryRead, StoreError> {
        let sql = &self.inner.sql;
        let filter = partition_filter(partitions);
        let latest: Vec<MinuteCount> = self
            .fetch_within(
                REPORT_TIMEOUT,
                &latest_minute(sql),
                "reading the latest stored minute",
            )
            .await?;
        let Some(latest_ms) = latest
            .first()
            .filter(|l| l.rows > 0)
            .map(|l| l.minute_s * 1000)
        else {
            return Ok(HistoryRead {
                rows: 0,
                since_ms: 0,
                latest_ms: None,
            });
        };
        let since_ms = latest_ms.saturating_sub(window_ms);
        let counts: Vec<MinuteCount> = self
            .fetch_within(
                REPORT_TIMEOUT,
                &rollup_minutes(sql, seconds(since_ms), &filter),
                "counting stored rollups",
            )
            .await?;
        let since_ms = history_cut(
            since_ms,
            max_rows,
            counts
                .into_iter()
                .map(|c| (c.minute_s * 1000, c.rows))
                .collect(),
        );
        let what = "reading stored rollups";
        let query = rollup_history(sql, seconds(since_ms), max_rows, &filter);
        let read = async {
            let mut cursor = self.inner.client.query_raw(&query).fetch::<RollupRow>()?;
            let mut n = 0;
            while let Some(row) = cursor.next().await? {
                let r = Rollup {
                    requests: row.requests,
                    outcomes: row.outcomes,
                    latency_count: row.latency_count,
                    latency_sum_ms: row.latency_sum_ms,
                    latency_max_ms: row.latency_max_ms,
                    latency_buckets: row.latency_buckets,
                };
                f(&row.key_id, row.minute_s * 1000, &r);
                n += 1;
            }
            Ok::<u64, ::clickhouse::error::Error>(n)
        };
        let rows = self.timed(REPORT_TIMEOUT, Phase::Query, what, read).await?;
        Ok(HistoryRead {
            rows,
            since_ms,
            latest_ms: Some(latest_ms),
        })
    }

    async fn source_history_async(
        &self,
        max_rows: u64,
        partitions: Option<&[TopicPartition]>,
        f: &mut dyn FnMut(SourceHistoryRow<'_>),
    ) -> Result<u64, StoreError> {
        let query = source_history(&self.inner.sql, max_rows, &partition_filter(partitions));
        let read = async {
            let mut cursor = self.inner.client.query_raw(&query).fetch::<SourceRow>()?;
            let mut n = 0;
            while let Some(r) = cursor.next().await? {
                f((
                    &r.key_id,
                    &r.ip,
                    &r.user_agent,
                    &r.endpoint,
                    r.first_seen_ms,
                    r.last_seen_ms,
                ));
                n += 1;
            }
            Ok::<u64, ::clickhouse::error::Error>(n)
        };
        self.timed(REPORT_TIMEOUT, Phase::Query, "reading stored sources", read)
            .await
    }

    async fn key_partitions_async(
        &self,
        since_ms: i64,
        partitions: &[TopicPartition],
        f: &mut dyn FnMut(&str, &str, i32),
    ) -> Result<u64, StoreError> {
        let query = key_partitions(
            &self.inner.sql,
            seconds(since_ms.max(0)),
            &partition_filter(Some(partitions)),
        );
        let read = async {
            let mut cursor = self
                .inner
                .client
                .query_raw(&query)
                .fetch::<KeyPartitionRow>()?;
            let mut n = 0;
            while let Some(r) = cursor.next().await? {
                f(&r.key_id, &r.topic, r.part);
                n += 1;
            }
            Ok::<u64, ::clickhouse::error::Error>(n)
        };
        self.timed(
            REPORT_TIMEOUT,
            Phase::Query,
            "reading the keys of partitions",
            read,
        )
        .await
    }
}

impl HistoryStore for ClickHouseStore {
    fn rollup_history(
        &mut self,
        window_ms: i64,
        max_rows: u64,
        partitions: Option<&[TopicPartition]>,
        f: &mut dyn FnMut(&str, i64, &Rollup),
    ) -> Result<HistoryRead, StoreError> {
        self.block_on(self.rollup_history_async(window_ms, max_rows, partitions, f))
    }

    fn source_history(
        &mut self,
        max_rows: u64,
        partitions: Option<&[TopicPartition]>,
        f: &mut dyn FnMut(SourceHistoryRow<'_>),
    ) -> Result<u64, StoreError> {
        self.block_on(self.source_history_async(max_rows, partitions, f))
    }

    fn key_partitions(
        &mut self,
        since_ms: i64,
        partitions: &[TopicPartition],
        f: &mut dyn FnMut(&str, &str, i32),
    ) -> Result<u64, StoreError> {
        self.block_on(self.key_partitions_async(since_ms, partitions, f))
    }
}
