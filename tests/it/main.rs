//! keywatch's integration tests: one test crate (one link, one support tree), a module per
//! area. They run the real binary against real services that the test setup starts
//! (`scripts/test.sh`): ClickHouse, Apache Kafka, an SMTP server; only Telegram's and
//! Slack's APIs are local stand-ins (`support::standins`), which check requests as the real
//! APIs do. Run one area with `cargo test --test it AREA::`.

mod support;

mod anomaly;
mod anomaly_daemon;
mod backlog;
mod bounds;
mod cli;
mod clickhouse_backtest;
mod clickhouse_detection;
mod clickhouse_https;
mod clickhouse_store;
mod cluster;
mod connect;
mod crash;
mod daemon;
mod dashboards;
mod dead_letters;
mod deploy;
mod dry_run;
mod file_source;
mod kafka;
#[cfg(feature = "kafka-tls")]
mod kafka_tls;
mod lifecycle;
mod notify;
mod notify_e2e;
mod notify_html;
mod operations;
mod rotation;
mod stack;
mod telegram;
