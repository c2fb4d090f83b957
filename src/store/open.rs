//! The one way to open the configured store: read-write for the daemon ([`open`]), read-only
//! for the commands that only read ([`open_read_only`]: `usage`, `rotations`, `findings`,
//! the one-shot report).

use std::sync::Arc;

use anyhow::Context;

use super::clickhouse::{ClickHouseConfig, ClickHouseStore};
use super::sqlite_offsets::SqliteOffsets;
use super::views::StoredFinding;
use super::{KeyUsage, SourceRow, SqliteStore, Store, StoreError, UsageReport};
use crate::config::{Config, StoreConfig};
use crate::detect::{FindingKind, RotationSource};
use crate::source::kafka::OffsetStore;

/// The store the config asks for, read-write, and how the Kafka source reads its offsets
/// back. ClickHouse's schema is migrated; it needs a tokio runtime.
pub fn open(config: &Config) -> anyhow::Result<(Box<dyn Store + Send>, Arc<dyn OffsetStore>)> {
    match &config.store {
        StoreConfig::Sqlite => {
            let store = SqliteStore::open(&config.state_dir)
                .with_context(|| format!("state_dir {}", config.state_dir.display()))?;
            let offsets = Arc::new(SqliteOffsets {
                state_dir: config.state_dir.clone(),
            });
            Ok((Box::new(store), offsets))
        }
        StoreConfig::ClickHouse(c) => {
            let store = open_clickhouse(c)?;
            let offsets: Arc<dyn OffsetStore> = Arc::new(store.clone());
            Ok((Box::new(store), offsets))
        }
    }
}

/// The ClickHouse store of the config, its password read and its schema migrated.
pub fn open_clickhouse(c: &ClickHouseConfig) -> anyhow::Result<ClickHouseStore> {
    let password = c
        .load_password()
        .map_err(|e| anyhow::anyhow!("store.clickhouse: {e}"))?;
    ClickHouseStore::open(c, password, tokio::runtime::Handle::current())
        .with_context(|| format!("store.clickhouse {}", c.url))
}

/// The configured store, opened to read: usage, sources, stored findings, the rotation view.
pub enum Reader {
    Sqlite(SqliteStore),
    ClickHouse(ClickHouseStore),
}

/// Opens the configured store read-only (SQLite: the file must exist; ClickHouse: no
/// migration).
pub fn open_read_only(config: &Config) -> anyhow::Result<Reader> {
    match &config.store {
        StoreConfig::Sqlite => Ok(Reader::Sqlite(SqliteStore::open_read_only(
            &config.state_dir,
        )?)),
        StoreConfig::ClickHouse(c) => {
            let password = c
                .load_password()
                .map_err(|e| anyhow::anyhow!("store.clickhouse: {e}"))?;
            Ok(Reader::ClickHouse(ClickHouseStore::open_read_only(
                c,
                password,
                tokio::runtime::Handle::try_current().ok(),
            )?))
        }
    }
}

impl Reader {
    /// Stored findings raised since `since_ms`, of `kind` when given.
    pub fn findings(
        &self,
        since_ms: Option<i64>,
        kind: Option<FindingKind>,
    ) -> Result<Vec<StoredFinding>, StoreError> {
        match self {
            Reader::Sqlite(s) => s.findings(since_ms, kind),
            Reader::ClickHouse(c) => c.findings(since_ms, kind),
        }
    }

    pub fn rotation_source(&self) -> &dyn RotationSource {
        match self {
            Reader::Sqlite(s) => s,
            Reader::ClickHouse(c) => c,
        }
    }

    fn usage(&self) -> &dyn UsageReport {
        match self {
            Reader::Sqlite(s) => s,
            Reader::ClickHouse(c) => c,
        }
    }

    /// Where the data is, for "nothing stored in ...".
    pub fn describe(&self, config: &Config) -> String {
        match (self, &config.store) {
            (Reader::ClickHouse(_), StoreConfig::ClickHouse(c)) => {
                format!("ClickHouse database {}", c.database)
            }
            _ => config.state_dir.display().to_string(),
        }
    }
}

impl UsageReport for Reader {
    fn key_usage(&self, since_ms: Option<i64>) -> Result<Vec<KeyUsage>, StoreError> {
        self.usage().key_usage(since_ms)
    }

    fn key_sources(&self, key_id: &str) -> Result<Vec<SourceRow>, StoreError> {
        self.usage().key_sources(key_id)
    }

    fn latest_event_ms(&self) -> Result<Option<i64>, StoreError> {
        self.usage().latest_event_ms()
    }
}

/// `check-config --connect`: reaches the ClickHouse server of `c` with its credentials
/// (`SELECT version()`, ten seconds at most) and says what answered, or what failed (without
/// the URL, which may carry credentials).
pub async fn ping(c: &ClickHouseConfig) -> Result<String, String> {
    let password = c.load_password()?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| e.without_url().to_string())?;
    let mut req = client
        .post(&c.url)
        .header("X-ClickHouse-User", &c.user)
        .body("SELECT version()");
    if let Some(p) = &password {
        req = req.header("X-ClickHouse-Key", p.expose());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("cannot reach the server: {}", chain(&e.without_url())))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let first = body
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect::<String>();
        return Err(format!("HTTP {status}: {first}"));
    }
    Ok(format!(
        "ClickHouse {} (database {})",
        body.trim(),
        c.database
    ))
}

/// An error with its causes (`error sending request: connection refused`); reqwest errors
/// have had their URL removed before they get here.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = c.source();
    }
    out
}
