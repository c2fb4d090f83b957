//! keywatch watches how API keys are used, so that key rotations finish without downtime.
//!
//! The crate map, in the order an event travels:
//!
//! - [`source`]: follows a gateway log file (like `tail -F`), stdin, or Kafka, and hands out
//!   batches of lines with the position after them.
//! - [`event`]: decodes a line into [`event::AuthEvent`]s (gateway presets or a field
//!   mapping) and fingerprints raw key material on arrival. Pure, no IO.
//! - [`aggregate`]: folds a batch of events into per-key per-minute rollups and per-key
//!   sources. Pure, no IO.
//! - [`store`]: writes a batch's rollups, sources and the source position atomically
//!   (embedded SQLite, or ClickHouse with offsets kept with the data).
//! - [`detect`] / [`detection`]: the rotation and stream detectors (pure) and how the
//!   daemon runs them; [`registry`]: keys, owners and lifecycle events.
//! - [`chart`]: a rotation's adoption chart (PNG) and sparkline, from the rotation view.
//! - [`notify`]: routes findings to owners and teams over email, Telegram, Slack, webhooks.
//! - [`anomaly`]: statistical models per key, and `keywatch score` for one series;
//!   [`anomaly_feed`]: how the daemon warms them up and feeds them committed batches.
//! - [`app`]: the wiring: bounded channels, tasks, metrics, shutdown order.
//! - [`config`]: raw serde structs validated into [`config::Config`]; no IO in validation.

pub mod aggregate;
pub mod anomaly;
pub mod chart;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod detect;
pub mod event;
pub mod notify;
pub mod registry;
pub mod sample;
pub mod source;
pub mod store;
pub mod telemetry;
