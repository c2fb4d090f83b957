#!/usr/bin/env python3
"""Runs every statement keywatch sends to ClickHouse on a current ClickHouse engine.

keywatch's ClickHouse store must work on ClickHouse 18.16 (Debian's package, which the Rust
tests run against) and on current versions. chdb-core is a current ClickHouse as a Python
module (no server). The Rust test `sql_catalog_runs_here_and_is_written_for_chdb`
(tests/clickhouse_store.rs) runs the catalog of statements on the real server, and writes it,
with that server's answers, to target/tmp/clickhouse-sql-catalog.json. This script runs the
same statements in chdb, in order:

- execute: DDL and ALTERs (migrations twice, as two instances would; deletions; TTL),
- insert: the exact RowBinary bytes keywatch sends, through
  `INSERT INTO t (cols) SELECT * FROM file(bin, 'RowBinary', structure)` with the insert
  settings keywatch adds on current servers,
- wait_zero: a count polled until 0 (mutations finishing),
- query: every report and bookkeeping query; where the catalog says `compare`, the answer
  must equal 18.16's (numbers compared as numbers).

Usage: check_schema.py [CATALOG_JSON]   (exit status 1 on any failure)
"""

import json
import math
import os
import sys
import tempfile
import time

DEFAULT_CATALOG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "tmp",
    "clickhouse-sql-catalog.json")


def sql_string(s):
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def same_value(a, b):
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def same_answer(got, want):
    got_lines = got.rstrip("\n").split("\n") if got.strip() else []
    want_lines = want.rstrip("\n").split("\n") if want.strip() else []
    if len(got_lines) != len(want_lines):
        return False
    for g, w in zip(got_lines, want_lines):
        gf, wf = g.split("\t"), w.split("\t")
        if len(gf) != len(wf) or not all(same_value(a, b) for a, b in zip(gf, wf)):
            return False
    return True


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CATALOG
    try:
        with open(path, encoding="utf-8") as f:
            catalog = json.load(f)
    except FileNotFoundError:
        print(f"check_schema.py: no catalog at {path}; run "
              "`cargo test --test it clickhouse_store::sql_catalog` first", file=sys.stderr)
        return 2

    from chdb import session  # imported late: a missing catalog is the likelier mistake

    failures = []
    counts = {"execute": 0, "insert": 0, "query": 0, "compared": 0, "wait_zero": 0}
    with tempfile.TemporaryDirectory(prefix="keywatch-chdb-") as tmp:
        s = session.Session(os.path.join(tmp, "db"))
        version = s.query("SELECT version()", "TabSeparated").bytes().decode().strip()
        print(f"chdb: ClickHouse {version}; answers compared with ClickHouse "
              f"{catalog.get('answers_from', '?')}")

        def run(name, sql, fmt="TabSeparated"):
            try:
                return s.query(sql, fmt).bytes().decode("utf-8")
            except Exception as e:  # chdb raises its own error types
                failures.append((name, sql, str(e).strip()))
                return None

        for step in catalog["steps"]:
            kind, name = step["kind"], step["name"]
            counts[kind] += 1
            if kind == "execute":
                run(name, step["sql"])
            elif kind == "insert":
                data = os.path.join(tmp, name + ".bin")
                with open(data, "wb") as f:
                    f.write(bytes.fromhex(step["data_hex"]))
                settings = ", ".join(f"{k} = {v}" for k, v in step["settings"])
                # keywatch's own statement must parse on this version too.
                if not step["sql"].startswith(f"INSERT INTO {step['table']} ("):
                    failures.append((name, step["sql"], "unexpected INSERT statement"))
                sql = (f"INSERT INTO {step['table']} ({step['columns']}) SELECT * FROM "
                       f"file({sql_string(data)}, 'RowBinary', {sql_string(step['structure'])})")
                if settings:
                    sql += " SETTINGS " + settings
                run(name, sql)
                got = run(name + " (row count)", f"SELECT count() FROM file("
                          f"{sql_string(data)}, 'RowBinary', {sql_string(step['structure'])})")
                if got is not None and int(got) != step["rows"]:
                    failures.append((name, sql, f"{got.strip()} rows decoded, "
                                                f"{step['rows']} sent"))
            elif kind == "wait_zero":
                deadline = time.time() + 60
                while True:
                    got = run(name, step["sql"])
                    if got is None or got.strip() == "0":
                        break
                    if time.time() > deadline:
                        failures.append((name, step["sql"], f"still {got.strip()} after 60 s"))
                        break
                    time.sleep(0.05)
            elif kind == "query":
                got = run(name, step["sql"])
                want = step.get("expected")
                if got is not None and step["compare"] and want is not None:
                    counts["compared"] += 1
                    if not same_answer(got, want):
                        failures.append((name, step["sql"],
                                         f"answer differs from 18.16's\n--- chdb:\n{got}"
                                         f"--- 18.16:\n{want}"))
            else:
                failures.append((name, "", f"unknown step kind {kind}"))

    print(f"ran {counts['execute']} statements, {counts['insert']} inserts, "
          f"{counts['query']} queries ({counts['compared']} answers compared), "
          f"{counts['wait_zero']} waits")
    for name, sql, err in failures:
        # ClickHouse errors quote the whole query; the statement is printed above them.
        err = err if len(err) <= 2000 else err[:2000] + " …"
        print(f"\nFAILED {name}\n  {sql}\n  {err}", file=sys.stderr)
    if failures:
        print(f"\n{len(failures)} failures", file=sys.stderr)
        return 1
    print("every statement runs on the current engine, and answers as on 18.16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
