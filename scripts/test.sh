#!/usr/bin/env bash
# Runs every keywatch test on a fresh machine: installs what is missing, then lints and
# tests. This is the command README.md gives, and what CI (.ci/run) runs.
#
# Today the tests need only the Rust toolchain: the embedded mode uses a bundled SQLite.
# Services for the full mode (ClickHouse, a Kafka-protocol broker, SMTP) are installed and
# started here as the features that need them land.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --locked --all-targets -- -D warnings

step "build"
cargo build --locked --all-targets

step "test"
cargo test --locked
