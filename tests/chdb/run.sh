#!/usr/bin/env bash
# Checks every statement keywatch sends to ClickHouse on a current ClickHouse engine:
# chdb-core (ClickHouse 26.9 in-process; a ~180 MB wheel, installed once into a venv under
# the target directory), against the answers of the real 18.16 server.
#
#   tests/chdb/run.sh
#
# 1. `cargo test --test it clickhouse_store::sql_catalog_runs_here_and_is_written_for_chdb`
#    runs the statements on ClickHouse 18.16 (KEYWATCH_TEST_CLICKHOUSE_URL, or a server it
#    starts itself) and writes them with its answers to target/tmp/clickhouse-sql-catalog.json.
# 2. tests/chdb/check_schema.py runs them in chdb and compares.
# 3. The same for every Grafana dashboard query: `cargo test --test it dashboards::
#    every_clickhouse_query` writes the expanded queries, the rows keywatch wrote and 18.16's
#    answers to target/tmp/dashboard-sql-catalog.json.
# 4. The dashboard queries as they ran on a two-shard cluster (see below).
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=${KEYWATCH_CHDB_VENV:-${CARGO_TARGET_DIR:-target}/chdb-venv}
catalog=${CARGO_TARGET_DIR:-target}/tmp/clickhouse-sql-catalog.json

if ! "$venv/bin/python" -c 'import chdb' 2>/dev/null; then
    echo "installing chdb-core into $venv (once, ~180 MB)"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'chdb-core==26.9.0'
fi

dashboards=${CARGO_TARGET_DIR:-target}/tmp/dashboard-sql-catalog.json
# KEYWATCH_CHDB_REUSE=1 (scripts/test.sh, right after the full test run, which wrote both
# files): check what that run wrote instead of running the two tests again.
reuse=${KEYWATCH_CHDB_REUSE:-}

if [ -z "$reuse" ] || [ ! -s "$catalog" ]; then
    cargo test --locked --quiet --test it clickhouse_store::sql_catalog_runs_here_and_is_written_for_chdb
fi
"$venv/bin/python" tests/chdb/check_schema.py "$catalog"

if [ -z "$reuse" ] || [ ! -s "$dashboards" ]; then
    cargo test --locked --quiet --test it dashboards::every_clickhouse_query_answers_on_data_keywatch_wrote
fi
"$venv/bin/python" tests/chdb/check_schema.py "$dashboards"

# 4. The same dashboard queries as they ran on a two-shard ClickHouse cluster
#    (`dashboards::every_clickhouse_query_answers_on_a_cluster`): in chdb on plain tables
#    holding what the cluster's Distributed tables read, compared with the cluster's
#    answers. The cluster's own statements (ON CLUSTER DDL, Replicated and Distributed
#    engines) are not run in chdb: they need ZooKeeper and remote servers.
cluster_dashboards=${CARGO_TARGET_DIR:-target}/tmp/dashboard-cluster-sql-catalog.json
if [ -z "$reuse" ] || [ ! -s "$cluster_dashboards" ]; then
    cargo test --locked --quiet --test it dashboards::every_clickhouse_query_answers_on_a_cluster
fi
exec "$venv/bin/python" tests/chdb/check_schema.py "$cluster_dashboards"
