//! Every statement keywatch sends to ClickHouse, as data, with sample rows: the tests run
//! it on the real 18.16 server, record the answers, and `tests/chdb/check_schema.py` runs
//! it again on a current engine (chdb) and compares.
//!
//! The statements come from the same [`Sql`] builders the store uses, and the inserts are
//! the exact RowBinary bytes the store sends for a sample batch.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::detection::{attempt_row, finding_row, finding_row_v1, notification_row_v1, StateRow};
use super::rowbinary::{encode, BatchId, RowBinary};
use super::schema::{ServerFeatures, Sql, Table};
use crate::detect::{Finding, FindingKind, Severity};
use crate::event::{AuthEvent, Outcome};
use crate::notify::AttemptRecord;
use crate::store::Origin;

/// One statement of the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// A statement whose answer is not compared (DDL, `ALTER`).
    Execute { name: String, sql: String },
    /// Rows as keywatch inserts them: `sql` is keywatch's `INSERT ... FORMAT RowBinary`,
    /// `structure` the columns with their types (for `file(..., 'RowBinary', structure)`),
    /// `settings` those keywatch adds on this server, `data_hex` the bytes it sends.
    Insert {
        name: String,
        table: String,
        sql: String,
        columns: String,
        structure: String,
        settings: Vec<(String, String)>,
        rows: usize,
        data_hex: String,
    },
    /// A query; when `compare`, its TabSeparated answer must be the same on every version
    /// (`expected` holds the answer of the server the catalog was first run on).
    Query {
        name: String,
        sql: String,
        compare: bool,
        expected: Option<String>,
    },
    /// A count to poll until it is 0 (mutations finishing).
    WaitZero { name: String, sql: String },
}

impl Step {
    pub fn name(&self) -> &str {
        match self {
            Step::Execute { name, .. }
            | Step::Insert { name, .. }
            | Step::Query { name, .. }
            | Step::WaitZero { name, .. } => name,
        }
    }
}

/// The sample source and topic.
pub const SAMPLE_SOURCE: &str = "kafka:keywatch";
const TOPIC: &str = "gateway-logs";

/// 2026-11-20T10:00:00Z, in ms.
const T0: i64 = 1_795_168_800_000;

type Sample = Vec<(AuthEvent<'static>, Origin)>;

/// Events of a committed batch, and of an interrupted one.
fn sample_events() -> (Sample, Sample) {
    let ev = |ts: i64, key: &'static str, status: u16, outcome: Outcome, latency: Option<f64>| {
        let mut e = AuthEvent::new(T0 + ts, Cow::Borrowed(key), status, outcome);
        e.latency_ms = latency;
        e.source_ip = Some(Cow::Borrowed("10.0.0.1"));
        e.user_agent = Some(Cow::Borrowed("curl/8.0"));
        e.method = Some(Cow::Borrowed("GET"));
        e.endpoint = Some(Cow::Borrowed("/v1/orders"));
        e.gateway = Some(Cow::Borrowed("kong-1"));
        e
    };
    let at = |partition: i32, offset: i64, index: u32| Origin {
        partition,
        offset,
        index,
    };
    let mut a1 = ev(5_123, "fp:aaaa", 200, Outcome::Ok, Some(12.5));
    a1.key_hint = Some("…wxyz".into());
    a1.consumer = Some(Cow::Borrowed("billing"));
    a1.request_id = Some(Cow::Borrowed("r-1"));
    let mut a2 = ev(5_900, "fp:aaaa", 401, Outcome::InvalidKey, None);
    a2.key_hint = Some("…wxyz".into());
    let mut b1 = ev(30_000, "cred-123", 403, Outcome::Forbidden, Some(250.0));
    b1.consumer = Some(Cow::Borrowed("o'brien\tteam \\ \"ops\""));
    b1.user_agent = Some(Cow::Borrowed("Mozilla/5.0 (X11; Linux) é中\n"));
    b1.endpoint = Some(Cow::Borrowed("/v1/users/:id"));
    let mut n1 = ev(
        59_999,
        crate::event::NO_KEY,
        401,
        Outcome::InvalidKey,
        Some(0.5),
    );
    n1.source_ip = None;
    n1.gateway = None;
    let a3 = ev(61_000, "fp:aaaa", 429, Outcome::RateLimited, Some(20_000.0));
    let b2 = ev(86_400_000, "cred-123", 200, Outcome::Ok, Some(7.0));
    let committed = vec![
        (a1, at(0, 100, 0)),
        (a2, at(0, 100, 1)),
        (b1, at(0, 101, 0)),
        (n1, at(0, 102, 0)),
        (a3, at(1, 40, 0)),
        (b2, at(1, 41, 0)),
    ];
    let uncommitted = vec![
        (
            ev(62_000, "fp:aaaa", 200, Outcome::Ok, Some(3.0)),
            at(0, 103, 0),
        ),
        (
            ev(63_000, "ghost", 200, Outcome::Ok, Some(3.0)),
            at(0, 104, 0),
        ),
    ];
    (committed, uncommitted)
}

fn insert_step(
    sql: &Sql,
    features: &ServerFeatures,
    name: &str,
    t: Table,
    rows: &RowBinary,
) -> Step {
    let cols = t.columns();
    Step::Insert {
        name: name.to_owned(),
        table: sql.table(t),
        sql: sql.insert(t),
        columns: cols
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        structure: cols
            .iter()
            .map(|(n, ty)| format!("{n} {ty}"))
            .collect::<Vec<_>>()
            .join(", "),
        settings: features
            .insert_settings
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        rows: rows.rows,
        data_hex: hex::encode(&rows.buf),
    }
}

/// The catalog for a server with `features`, in the order to run it.
pub fn build(sql: &Sql, features: &ServerFeatures) -> Vec<Step> {
    // Long enough that the fixed sample times never expire on any test machine.
    const RETENTION_DAYS: u32 = 36_500;
    let mut steps = Vec::new();
    let exec = |name: &str, s: String| Step::Execute {
        name: name.into(),
        sql: s,
    };
    let query = |name: &str, s: String, compare: bool| Step::Query {
        name: name.into(),
        sql: s,
        compare,
        expected: None,
    };

    steps.push(query("version", Sql::version().into(), false));
    steps.push(query("known_settings", Sql::known_settings(), false));
    steps.push(query("database_exists", sql.database_exists(), true));
    steps.push(exec("create_database", sql.create_database()));
    steps.push(query(
        "migrations_table_exists_before",
        sql.migrations_table_exists(),
        true,
    ));
    steps.push(exec(
        "create_migrations_table",
        sql.create_migrations_table(),
    ));
    steps.push(query(
        "migrations_table_exists",
        sql.migrations_table_exists(),
        true,
    ));
    steps.push(query("schema_version_empty", sql.schema_version(), true));
    for (i, m) in sql.migrations(features, RETENTION_DAYS).iter().enumerate() {
        for (j, s) in m.iter().enumerate() {
            steps.push(exec(&format!("migration_{}_{}", i + 1, j + 1), s.clone()));
        }
        steps.push(exec(
            &format!("record_migration_{}", i + 1),
            sql.record_migration(i as u32 + 1, "keywatch catalog"),
        ));
    }
    // Run twice, as a second instance would.
    for (i, m) in sql.migrations(features, RETENTION_DAYS).iter().enumerate() {
        for (j, s) in m.iter().enumerate() {
            steps.push(exec(
                &format!("migration_again_{}_{}", i + 1, j + 1),
                s.clone(),
            ));
        }
    }
    steps.push(query("schema_version", sql.schema_version(), true));

    // A committed batch over partitions 0 (offsets 100..=102) and 1 (40..=41), and an
    // interrupted one (0: 103..=104) without its offsets rows.
    let (committed, uncommitted) = sample_events();
    let id = |part, batch_end| BatchId {
        src: SAMPLE_SOURCE,
        topic: TOPIC,
        part,
        batch_end,
    };
    let ids = [id(0, 102), id(1, 41)];
    let batch = encode(
        committed.iter().map(|(e, o)| (e, o, o.partition as usize)),
        &ids,
        None,
    );
    for (t, rows) in batch.tables() {
        steps.push(insert_step(
            sql,
            features,
            &format!("insert_{}", t.suffix()),
            t,
            rows,
        ));
    }
    let mut offsets = RowBinary::default();
    for (part, batch_end) in [(0, 102), (1, 41)] {
        let id = BatchId {
            src: SAMPLE_SOURCE,
            topic: TOPIC,
            part,
            batch_end,
        };
        offsets.offset(&id, batch_end + 1, "", T0 + 120_000);
    }
    steps.push(insert_step(
        sql,
        features,
        "insert_offsets",
        Table::Offsets,
        &offsets,
    ));
    let lost = encode(
        uncommitted.iter().map(|(e, o)| (e, o, 0)),
        &[id(0, 104)],
        None,
    );
    for (t, rows) in lost.tables() {
        steps.push(insert_step(
            sql,
            features,
            &format!("insert_uncommitted_{}", t.suffix()),
            t,
            rows,
        ));
    }

    // The rotation view counts committed batches only, before recovery too.
    steps.push(query(
        "rotation_hours_before_recovery",
        sql.rotation_hours("fp:aaaa", "ghost", 0),
        true,
    ));

    // The backtest's replay (replay.rs) reads committed batches only, before recovery too.
    steps.push(query(
        "replay_events_before_recovery",
        sql.replay_events(T0, T0 + 3_600_000, None, 1000),
        true,
    ));
    steps.push(query(
        "replay_next_event_before_recovery",
        sql.replay_next_event(T0 + 61_001, T0 + 3_600_000),
        true,
    ));

    // Recovery, as ClickHouseStore::recover runs it.
    steps.push(query("running_writes", sql.running_writes(), true));
    steps.push(query(
        "still_running",
        Sql::still_running(&["keywatch-no-such-query".into()]),
        true,
    ));
    steps.push(query("read_offsets", sql.read_offsets(SAMPLE_SOURCE), true));
    let filter = Sql::uncommitted_filter(
        SAMPLE_SOURCE,
        &[
            (TOPIC, 0, Some(103)),
            (TOPIC, 1, Some(42)),
            (TOPIC, 2, None),
        ],
    );
    steps.push(Step::WaitZero {
        name: "pending_mutations_before".into(),
        sql: sql.pending_mutations(),
    });
    for t in Table::BATCH_ROWS {
        steps.push(query(
            &format!("count_uncommitted_{}", t.suffix()),
            sql.count_where(t, &filter),
            true,
        ));
    }
    for t in Table::BATCH_ROWS {
        steps.push(exec(
            &format!("delete_uncommitted_{}", t.suffix()),
            sql.delete_where(t, &filter),
        ));
    }
    steps.push(Step::WaitZero {
        name: "pending_mutations".into(),
        sql: sql.pending_mutations(),
    });
    for t in Table::BATCH_ROWS {
        steps.push(query(
            &format!("count_uncommitted_after_{}", t.suffix()),
            sql.count_where(t, &filter),
            true,
        ));
    }

    // Reports.
    steps.push(query("key_usage_all", sql.key_usage(None), true));
    steps.push(query(
        "key_usage_since",
        sql.key_usage(Some(((T0 + 60_000) / 1000) as u32)),
        true,
    ));
    steps.push(query("key_sources_fp", sql.key_sources("fp:aaaa"), true));
    steps.push(query("key_sources_cred", sql.key_sources("cred-123"), true));
    steps.push(query("key_sources_none", sql.key_sources("nobody'"), true));
    steps.push(query("totals", sql.totals(), true));
    steps.push(query("latest_event", sql.latest_event(), true));
    // The anomaly models' warm-up (history.rs).
    let since = super::rowbinary::seconds(T0 - 86_400_000);
    steps.push(query(
        "history_latest_minute",
        super::history::latest_minute(sql),
        true,
    ));
    steps.push(query(
        "history_rollup_minutes",
        super::history::rollup_minutes(sql, since, ""),
        true,
    ));
    steps.push(query(
        "history_rollups",
        super::history::rollup_history(sql, since, 1000, ""),
        true,
    ));
    // Partition 0 of the sample topic (rows to compare) and one of another topic.
    let parts = super::history::partition_filter(Some(&[
        (TOPIC.to_owned(), 0),
        ("other-topic".to_owned(), 1),
    ]));
    steps.push(query(
        "history_rollups_of_partitions",
        super::history::rollup_history(sql, since, 1000, &parts),
        true,
    ));
    steps.push(query(
        "history_key_partitions",
        super::history::key_partitions(sql, since, &parts),
        true,
    ));
    steps.push(query(
        "history_rollups_limited",
        super::history::rollup_history(sql, since, 1, ""),
        true,
    ));
    steps.push(query(
        "history_sources",
        super::history::source_history(sql, 1000, ""),
        true,
    ));
    steps.push(query(
        "history_sources_of_partitions",
        super::history::source_history(sql, 1000, &parts),
        true,
    ));
    // The views dashboards read, and the raw rows as the server decoded them.
    let d = &sql.database;
    let p = &sql.prefix;
    steps.push(query(
        "view_rollup_minute",
        format!("SELECT * FROM {d}.{p}rollup_minute_v ORDER BY key_id, minute"),
        true,
    ));
    steps.push(query(
        "view_key_sources",
        format!(
            "SELECT * FROM {d}.{p}key_sources_v ORDER BY key_id, ip, user_agent, endpoint, gateway"
        ),
        true,
    ));
    steps.push(query(
        "view_keys",
        format!("SELECT * FROM {d}.{p}keys_v ORDER BY key_id"),
        true,
    ));
    let cols: Vec<String> = Table::Events
        .columns()
        .into_iter()
        .map(|(n, ty)| match ty {
            "DateTime" => format!("toUInt32({n})"),
            t if t.starts_with("Enum8") => format!("toString({n})"),
            _ => n,
        })
        .collect();
    steps.push(query(
        "events_as_stored",
        format!(
            "SELECT {} FROM {} ORDER BY part, msg_offset, idx",
            cols.join(", "),
            sql.table(Table::Events)
        ),
        true,
    ));

    // The backtest's replay: a page, the page after it (keyset on the replay order), the
    // next event after an empty hour, and none left.
    steps.push(query(
        "replay_events_all",
        sql.replay_events(i64::MIN, i64::MAX, None, 1000),
        true,
    ));
    steps.push(query(
        "replay_events_page",
        sql.replay_events(T0, T0 + 3_600_000, None, 2),
        true,
    ));
    let after = super::replay::ReplayKey {
        ts_ms: T0 + 5_900,
        src: SAMPLE_SOURCE.into(),
        topic: TOPIC.into(),
        part: 0,
        msg_offset: 100,
        idx: 1,
    };
    steps.push(query(
        "replay_events_next_page",
        sql.replay_events(T0, T0 + 3_600_000, Some(&after), 2),
        true,
    ));
    steps.push(query(
        "replay_next_event",
        sql.replay_next_event(T0 + 3_600_000, i64::MAX),
        true,
    ));
    steps.push(query(
        "replay_next_event_none",
        sql.replay_next_event(T0 + 86_400_001, i64::MAX),
        true,
    ));

    // Rotations and findings (schema version 2).
    steps.push(query(
        "rotation_hours",
        sql.rotation_hours("fp:aaaa", "cred-123", ((T0 + 3_600_000) / 1000) as u32),
        true,
    ));
    steps.push(query(
        "rotation_hours_all",
        sql.rotation_hours("fp:aaaa", "cred-123", 0),
        true,
    ));
    steps.push(query(
        "rotation_sources",
        sql.rotation_sources("fp:aaaa", "cred-123"),
        true,
    ));
    steps.push(query(
        "finding_states_empty",
        sql.finding_states(&["lingering:fp:aaaa"]),
        true,
    ));
    let mut findings = RowBinary::default();
    let mut mirror = RowBinary::default();
    for (key, kind, first, last, raised, summary) in [
        (
            "lingering:fp:aaaa:10.0.0.1",
            FindingKind::LingeringOldKey,
            5_123,
            5_123,
            1,
            "one",
        ),
        (
            "lingering:fp:aaaa:10.0.0.1",
            FindingKind::LingeringOldKey,
            5_123,
            61_000,
            2,
            "two",
        ),
        (
            "revoked:cred-123",
            FindingKind::RevokedKeyUsed,
            30_000,
            30_000,
            1,
            "o'brien\t",
        ),
    ] {
        let f = Finding {
            kind,
            key_id: "fp:aaaa".into(),
            owner: (raised == 2).then(|| "acme".into()),
            at_ms: T0 + last,
            severity: Severity::Warning,
            summary: summary.into(),
            evidence: serde_json::json!({"raised": raised, "ua": "é中\n"}),
            dedup_key: key.into(),
        };
        let state = StateRow {
            dedup_key: key.into(),
            first_at_ms: T0 + first,
            last_at_ms: T0 + last,
            raised,
            claimed_by: "catalog".into(),
        };
        finding_row(&mut findings, &state, &f).expect("sample evidence");
        finding_row_v1(&mut mirror, &state, &f).expect("sample evidence");
    }
    steps.push(insert_step(
        sql,
        features,
        "insert_finding_state",
        Table::FindingState,
        &findings,
    ));
    steps.push(insert_step(
        sql,
        features,
        "insert_findings_v1",
        Table::Findings,
        &mirror,
    ));
    steps.push(query(
        "findings_v1",
        format!(
            "SELECT dedup_key, kind, owner, toUInt32(at), summary FROM {} FINAL \
             ORDER BY dedup_key",
            sql.table(Table::Findings)
        ),
        true,
    ));
    steps.push(query(
        "finding_states",
        sql.finding_states(&["lingering:fp:aaaa:10.0.0.1", "revoked:cred-123", "none'"]),
        true,
    ));
    steps.push(query(
        "stored_findings_all",
        sql.stored_findings(None, None),
        true,
    ));
    steps.push(query(
        "stored_findings_since_kind",
        sql.stored_findings(Some(T0 + 30_000), Some("lingering_old_key")),
        true,
    ));
    let mut attempts = RowBinary::default();
    let mut notifications = RowBinary::default();
    let attempt = AttemptRecord {
        message_id: "m-1".into(),
        recipient: "acme".into(),
        receiver: "owner".into(),
        channel: "tg".into(),
        channel_type: "telegram".into(),
        target: "telegram:-1001234567890".into(),
        kinds: "lingering_old_key,rotation_reminder".into(),
        findings: vec!["lingering_old_key:a:b:10.0.0.1|curl".into()],
        severity: "warning".into(),
        created_ms: T0,
        attempt: 2,
        started_ms: T0 + 1_000,
        finished_ms: T0 + 1_250,
        outcome: "transient",
        detail: Some("429 retry after 3s".into()),
    };
    let delivered = AttemptRecord {
        message_id: "m-2".into(),
        attempt: 1,
        started_ms: T0 + 2_000,
        finished_ms: T0 + 2_300,
        outcome: "ok",
        detail: None,
        ..attempt.clone()
    };
    for a in [&attempt, &delivered] {
        attempt_row(&mut attempts, a);
        notification_row_v1(&mut notifications, a);
    }
    steps.push(insert_step(
        sql,
        features,
        "insert_notify_attempts",
        Table::NotifyAttempts,
        &attempts,
    ));
    steps.push(query(
        "notify_attempts",
        format!(
            "SELECT message_id, target, attempt, started_ms, outcome, detail, toUInt32(at) FROM {} \
             ORDER BY message_id, attempt",
            sql.table(Table::NotifyAttempts)
        ),
        true,
    ));

    steps.push(insert_step(
        sql,
        features,
        "insert_notifications_v1",
        Table::Notifications,
        &notifications,
    ));
    for (name, recipient, key) in [
        (
            "last_delivered",
            "acme",
            "lingering_old_key:a:b:10.0.0.1|curl",
        ),
        (
            "last_delivered_other_recipient",
            "globex",
            "lingering_old_key:a:b:10.0.0.1|curl",
        ),
        ("last_delivered_never", "acme", "revoked:cred-123"),
    ] {
        steps.push(query(name, sql.last_delivered(recipient, key), true));
    }
    steps.push(query(
        "notifications_v1",
        format!(
            "SELECT id, finding_key, channel, recipient, step, attempt, outcome, error, \
             toUInt32(at) FROM {} ORDER BY id, attempt",
            sql.table(Table::Notifications)
        ),
        true,
    ));

    // Retention.
    steps.push(query("events_engine", sql.events_engine(), false));
    if features.ttl {
        steps.push(exec("modify_ttl", sql.modify_ttl(RETENTION_DAYS - 1)));
    }
    steps.push(query("event_partitions", sql.event_partitions(), true));
    steps.push(exec(
        "drop_event_partition",
        sql.drop_event_partition(19_700_101),
    ));
    steps.push(query("totals_after_retention", sql.totals(), true));
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let steps = build(&Sql::new("kw", "keywatch_"), &ServerFeatures::current());
        let mut names: Vec<&str> = steps.iter().map(Step::name).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
        let json = serde_json::to_string(&steps).unwrap();
        let back: Vec<Step> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, steps);
    }
}
