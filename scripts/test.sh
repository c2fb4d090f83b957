#!/usr/bin/env bash
# Runs every keywatch test on a fresh machine: installs what is missing, then lints and
# tests. This is the command README.md gives, and what CI (.ci/run) runs.
#
# What the tests need beyond Rust, installed here when missing (and skipped when present):
#   - Apache Kafka 4 (the broker, KRaft mode: no ZooKeeper), fetched from Maven Central by
#     scripts/kafka.sh into ~/.cache/keywatch/ (about 45 MB, seconds), run on Java 17+;
#     Java and Maven from Debian's packages when missing;
#   - kcat, from Debian's packages (kafkacat): produces test data by hand (README);
#   - libssl-dev and pkg-config, from Debian's packages: the kafka-tls feature (librdkafka
#     with OpenSSL) is built and tested against a SASL_SSL broker;
#   - clickhouse-server, from Debian's packages (ClickHouse 18.16);
#   - python3-aiosmtpd and openssl, from Debian's packages (a real SMTP server with STARTTLS
#     and AUTH for the email tests);
#   - docker-compose, from Debian's packages (tests/deploy.rs validates docker-compose.yml
#     with `docker-compose config`; no Docker engine is needed);
#   - python3-yaml and systemd, from Debian's packages (tests/deploy.rs reads the YAML files
#     and runs `systemd-analyze verify` on the unit);
#   - prometheus (promtool and the server), from Debian's packages: the alert rules on
#     keywatch itself are checked and unit-tested, and a real Prometheus scrapes keywatch;
#   - helm 4, built from the Go module proxy into ~/go/bin (the Helm chart is linted and
#     rendered);
#   - chromium, from Debian's packages: tests/it/notify_html.rs renders the reminder email
#     headless and keeps the screenshot under target/tmp/notify-artifacts/;
#   - chdb-core, from PyPI, into a venv under target/ (tests/chdb/run.sh): a current
#     ClickHouse engine, in-process, to check that the schema and queries also run on
#     today's ClickHouse;
#   - a nightly Rust toolchain (rustup) and cargo-fuzz (crates.io), for a few seconds of
#     every fuzz target (scripts/fuzz.sh, FUZZING.md); GNU time (/usr/bin/time, Debian's
#     `time`) measures peak memory in tests/it/bounds.rs.
# Tests start the servers they need on free loopback ports with temporary data directories
# (tests/it/support/kafka.rs starts Kafka brokers and three-node clusters; one shared ClickHouse
# server started here, and any test that stops its server starts its own), and everything is
# stopped at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
export PATH="$HOME/.cargo/bin:$PATH"
# The build (and the chdb venv under it) is kept between runs, outside the checkout, like the
# fuzz build (scripts/fuzz.sh): a fresh checkout on a machine that ran the tests before (CI)
# builds only what changed, not every dependency again. CARGO_TARGET_DIR=target for the
# checkout's own directory.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keywatch/target}"

step "services"
if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    echo "installing Java and Maven (to fetch and run Apache Kafka) from Debian's packages"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq openjdk-17-jre-headless maven
fi
if ! command -v kcat >/dev/null && ! command -v kafkacat >/dev/null; then
    echo "installing kcat (a Kafka command-line client) from Debian's packages"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq kafkacat
fi
kafka_libs=$(bash scripts/kafka.sh fetch)
if ! pkg-config --exists openssl 2>/dev/null; then
    echo "installing libssl-dev and pkg-config (the kafka-tls feature builds librdkafka with OpenSSL)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq libssl-dev pkg-config
fi
if ! command -v clickhouse-server >/dev/null; then
    echo "installing clickhouse-server from Debian's packages"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq clickhouse-server clickhouse-client
fi
if ! ls /usr/share/java/zookeeper*.jar >/dev/null 2>&1; then
    echo "installing ZooKeeper (the ClickHouse cluster tests: tests/it/cluster.rs) from Debian's packages"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq zookeeper
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
if ! command -v chromium >/dev/null; then
    echo "installing chromium (renders the HTML reminder email to a screenshot)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium
fi
if ! command -v docker-compose >/dev/null; then
    echo "installing docker-compose (validates docker-compose.yml without an engine)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq docker-compose
fi
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    echo "installing prometheus (promtool checks and unit-tests deploy/prometheus/alerts.yml; a real Prometheus scrapes keywatch)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus
fi
if ! command -v helm >/dev/null && [ ! -x "$HOME/go/bin/helm" ]; then
    command -v go >/dev/null || { echo "go is required to build helm (https://go.dev/dl)" >&2; exit 1; }
    echo "building helm 4 from the Go module proxy (lints and renders deploy/helm/keywatch; a few minutes, once)"
    GOFLAGS=-mod=mod go install helm.sh/helm/v4/cmd/helm@v4.3.2
fi
if [ ! -x /usr/bin/time ]; then
    echo "installing GNU time (the bounds tests measure peak memory with it)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq time
fi
echo "Apache Kafka: $kafka_libs (java: $(command -v java))"
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
# The chdb step below checks the SQL catalogues this run writes: none from an earlier run.
rm -f "${CARGO_TARGET_DIR:-target}/tmp/clickhouse-sql-catalog.json" \
    "${CARGO_TARGET_DIR:-target}/tmp/dashboard-sql-catalog.json" \
    "${CARGO_TARGET_DIR:-target}/tmp/dashboard-cluster-sql-catalog.json"
KEYWATCH_TEST_KAFKA_LIBS=$kafka_libs cargo test --locked

step "Kafka over SASL_SSL with SCRAM-SHA-512 (the kafka-tls feature)"
KEYWATCH_TEST_KAFKA_LIBS=$kafka_libs cargo test --locked --features kafka-tls --test it kafka_tls::

step "current ClickHouse (chdb-core): every statement keywatch sends"
KEYWATCH_CHDB_REUSE=1 bash tests/chdb/run.sh

step "fuzz: every target for a few seconds (long runs: scripts/fuzz.sh long, FUZZING.md)"
# scripts/fuzz.sh installs nightly and cargo-fuzz when missing; a crash fails this step and
# leaves the input in fuzz/artifacts/TARGET/.
bash scripts/fuzz.sh smoke "${KEYWATCH_FUZZ_SECONDS:-5}"
