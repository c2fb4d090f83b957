//! A real ClickHouse server for the tests: the shared one scripts/test.sh starts
//! (`KEYWATCH_TEST_CLICKHOUSE_URL`), or a private one started here.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct ClickHouse {
    pub url: String,
    /// Set when this process started the server (and stops it on drop).
    dir: Option<PathBuf>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/clickhouse.sh")
}

impl ClickHouse {
    /// The shared server if there is one, else a private one.
    pub fn shared_or_start(dir: &Path) -> ClickHouse {
        match std::env::var("KEYWATCH_TEST_CLICKHOUSE_URL") {
            Ok(url) if !url.is_empty() => ClickHouse { url, dir: None },
            _ => Self::start(dir),
        }
    }

    /// A private server in `dir` (for tests that stop and start it).
    pub fn start(dir: &Path) -> ClickHouse {
        let out = Command::new("bash")
            .arg(script())
            .args(["start", dir.to_str().unwrap(), "auto"])
            .output()
            .expect("running scripts/clickhouse.sh");
        assert!(
            out.status.success(),
            "starting ClickHouse: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_owned();
        ClickHouse {
            url,
            dir: Some(dir.to_owned()),
        }
    }

    pub fn stop(&self) {
        if let Some(dir) = &self.dir {
            let _ = Command::new("bash")
                .arg(script())
                .args(["stop", dir.to_str().unwrap()])
                .status();
        }
    }

    /// Starts a private server again on the same port and data.
    pub fn restart_after_stop(&self) {
        let dir = self
            .dir
            .as_ref()
            .expect("only a private server can be restarted");
        let port = self.url.rsplit(':').next().unwrap().trim_end_matches('/');
        let out = Command::new("bash")
            .arg(script())
            .args(["start", dir.to_str().unwrap(), port])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// (requests in the rollups, rows in the raw events table) of a keywatch database.
    pub fn totals(&self, database: &str) -> Option<(u64, u64)> {
        let q = |sql: &str| -> Option<u64> {
            let r = reqwest::blocking::Client::new()
                .post(&self.url)
                .body(sql.to_owned())
                .send()
                .ok()?;
            if !r.status().is_success() {
                return None;
            }
            r.text().ok()?.trim().parse().ok()
        };
        Some((
            q(&format!(
                "SELECT sum(requests) FROM {database}.keywatch_rollup_minute"
            ))?,
            q(&format!("SELECT count() FROM {database}.keywatch_events"))?,
        ))
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A database name no other test (or test run) uses: `{prefix}_{pid}_{n}_{nanos}`.
pub fn fresh_database(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
