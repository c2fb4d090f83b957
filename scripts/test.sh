#!/usr/bin/env bash
# Runs every keywatch test on a fresh machine: installs what is missing, then lints and
# tests. This is the command README.md gives, and what CI (.ci/run) runs.
#
# What the tests need beyond Rust, installed here when missing (and skipped when present):
#   - tansu, a Kafka-protocol broker, from crates.io (about 20-40 minutes to build the
#     first time on 2 cores);
#   - clickhouse-server, from Debian's packages (ClickHouse 18.16);
#   - chdb-core, from PyPI: a current ClickHouse engine, in-process, to check that the schema
#     and queries also run on today's ClickHouse.
# The tests start their own servers on free loopback ports with temporary data directories
# (tests/common/kafka.rs, scripts/clickhouse.sh), so nothing is left running.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
export PATH="$HOME/.cargo/bin:$PATH"

step "services"
if ! command -v tansu >/dev/null; then
    echo "installing tansu (Kafka-protocol broker) from crates.io; the first build is slow"
    cargo install --locked tansu --version 0.6.0 --features dynostore,libsql
fi
if ! command -v clickhouse-server >/dev/null; then
    echo "installing clickhouse-server from Debian's packages"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq clickhouse-server clickhouse-client
fi
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import chdb' 2>/dev/null; then
    echo "installing chdb-core (current ClickHouse engine) from PyPI"
    "$PYTHON" -m pip install --quiet chdb-core
fi
echo "tansu: $(command -v tansu)"
echo "clickhouse-server: $(command -v clickhouse-server)"

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --locked --all-targets -- -D warnings

step "build"
cargo build --locked --all-targets

step "test"
cargo test --locked
