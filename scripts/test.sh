#!/usr/bin/env bash
# Runs every keywatch test on a fresh machine: installs what is missing, then lints and
# tests. This is the command README.md gives, and what CI (.ci/run) runs.
#
# What the tests need beyond Rust, installed here when missing (and skipped when present):
#   - tansu, a Kafka-protocol broker, from crates.io (about 20-40 minutes to build the
#     first time on 2 cores);
#   - clickhouse-server, from Debian's packages (ClickHouse 18.16);
#   - python3-aiosmtpd and openssl, from Debian's packages (a real SMTP server with STARTTLS
#     and AUTH for the email tests);
#   - docker-compose, from Debian's packages (tests/deploy.rs validates docker-compose.yml
#     with `docker-compose config`; no Docker engine is needed);
#   - python3-yaml and systemd, from Debian's packages (tests/deploy.rs reads the YAML files
#     and runs `systemd-analyze verify` on the unit);
#   - chdb-core, from PyPI, into a venv under target/ (tests/chdb/run.sh): a current
#     ClickHouse engine, in-process, to check that the schema and queries also run on
#     today's ClickHouse.
# Tests start the servers they need on free loopback ports with temporary data directories
# (tests/common/kafka.rs for tansu; one shared ClickHouse server started here, and any
# test that stops its server starts its own), and everything is stopped at exit.
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
if ! /usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || ! command -v openssl >/dev/null; then
    echo "installing aiosmtpd (a real SMTP server for the email tests) and openssl"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-aiosmtpd openssl
fi
if ! /usr/bin/python3 -c 'import yaml' 2>/dev/null || ! command -v systemd-analyze >/dev/null; then
    echo "installing python3-yaml and systemd (tests/deploy.rs reads YAML and verifies the unit)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-yaml systemd
fi
if ! command -v docker-compose >/dev/null; then
    echo "installing docker-compose (validates docker-compose.yml without an engine)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq docker-compose
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
ch_dir=$(mktemp -d -t keywatch-clickhouse.XXXXXX)
trap 'bash scripts/clickhouse.sh stop "$ch_dir" >/dev/null 2>&1 || true; rm -rf "$ch_dir"' EXIT
KEYWATCH_TEST_CLICKHOUSE_URL=$(bash scripts/clickhouse.sh start "$ch_dir" auto | tail -n1)
export KEYWATCH_TEST_CLICKHOUSE_URL
echo "ClickHouse for the tests: $KEYWATCH_TEST_CLICKHOUSE_URL"
cargo test --locked

step "current ClickHouse (chdb-core): every statement keywatch sends"
bash tests/chdb/run.sh
