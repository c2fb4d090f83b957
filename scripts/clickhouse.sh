#!/usr/bin/env bash
# Starts and stops a private ClickHouse server for keywatch's tests.
#
#   scripts/clickhouse.sh start DIR PORT   # HTTP on PORT, native TCP on PORT+1; prints the URL
#                                          # (PORT `auto`: a free pair in 20123-29922, clear of
#                                          # the cluster's ports from 19181)
#   scripts/clickhouse.sh stop DIR         # stops the server started in DIR
#   scripts/clickhouse.sh url DIR          # prints the URL of the server running in DIR
#   scripts/clickhouse.sh cluster-start DIR SHARDS REPLICAS
#                                          # ZooKeeper and SHARDS x REPLICAS servers in DIR;
#                                          # prints one line per server: `SHARD REPLICA URL`
#   scripts/clickhouse.sh cluster-stop DIR # stops them all
#
# DIR/extra.xml, when present, is copied into the server's configuration (the cluster's
# ZooKeeper, macros and remote_servers; a test's https_port and certificates), so that a
# server stopped and started again keeps it. The cluster is named `keywatch` (every server
# of it, SHARDS shards of REPLICAS replicas, internal_replication on) and its servers are
# DIR/s{shard}r{replica}; ZooKeeper (Debian's package, installed with apt-get when missing)
# runs in DIR/zookeeper.
#
# The server (Debian's clickhouse-server, 18.16 on Debian 12) listens on 127.0.0.1 only and
# keeps its configuration, data, logs and pid file inside DIR, so that several can run at
# once. It is installed with apt-get when missing. Starting twice in the same DIR reuses the
# running server.
set -euo pipefail

die() { echo "clickhouse.sh: $*" >&2; exit 1; }

find_server() {
    for c in clickhouse-server /usr/sbin/clickhouse-server /usr/bin/clickhouse-server; do
        if command -v "$c" >/dev/null 2>&1; then command -v "$c"; return 0; fi
    done
    return 1
}

install_server() {
    echo "clickhouse.sh: clickhouse-server not found, installing it with apt-get" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq clickhouse-server >&2
}

ping_ok() (
    # curl is not always present; bash's /dev/tcp is. A subshell, so that fd 3 and the
    # silenced stderr stay local.
    exec 2>/dev/null
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    reply=$(timeout 2 cat <&3 || true)
    [[ "$reply" == *$'\r\n\r\nOk.'* ]]
)

write_config() {
    local dir=$1 port=$2
    # KEYWATCH_CH_QUERY_LOG=1: every query in system.query_log (benchmarks read where the
    # server's time goes); off by default, since the log costs a little per query.
    local query_log_section="" log_queries=0
    if [ "${KEYWATCH_CH_QUERY_LOG:-0}" = 1 ]; then
        query_log_section="    <query_log><database>system</database><table>query_log</table><flush_interval_milliseconds>1000</flush_interval_milliseconds></query_log>"
        log_queries=1
    fi
    mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas" "$dir/log"
    cat >"$dir/config.xml" <<EOF
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>$dir/log/clickhouse-server.log</log>
        <errorlog>$dir/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>2</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$port</http_port>
    <tcp_port>$((port + 1))</tcp_port>
    <max_connections>256</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>64</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>$dir/data/</path>
    <tmp_path>$dir/tmp/</tmp_path>
    <user_files_path>$dir/user_files/</user_files_path>
    <format_schema_path>$dir/format_schemas/</format_schema_path>
    <users_config>$dir/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
    <max_session_timeout>3600</max_session_timeout>
    <default_session_timeout>60</default_session_timeout>
$query_log_section
$(cat "$dir/extra.xml" 2>/dev/null || true)
</yandex>
EOF
    # Two users: `default` without a password (what the tests use) and `keywatch` with the
    # password `keywatch-test` (to test authentication and that errors never show it).
    cat >"$dir/users.xml" <<EOF
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <log_queries>$log_queries</log_queries>
            <max_memory_usage>4000000000</max_memory_usage>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
        <keywatch>
            <password>keywatch-test</password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </keywatch>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
EOF
}

running_pid() {
    local dir=$1 pid
    [ -f "$dir/server.pid" ] || return 1
    pid=$(cat "$dir/server.pid")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

port_free() (
    exec 2>/dev/null
    ! exec 3<>"/dev/tcp/127.0.0.1/$1"
)

start() {
    local dir=$1 port=$2
    if [ "$port" = auto ] && ! running_pid "$dir" >/dev/null; then
        # From a random pair, not the first free one: a test that stops its server and
        # starts it again on the same port must not find it taken meanwhile by another
        # test's new server, and servers started at the same moment must not pick the same.
        local first=$((20123 + 2 * (RANDOM % 4900))) tries=0
        port=$first
        until port_free "$port" && port_free $((port + 1)); do
            port=$((port + 2))
            [ "$port" -lt 29923 ] || port=20123
            tries=$((tries + 1))
            [ "$tries" -lt 4900 ] || die "no free port pair in 20123-29922"
        done
    fi
    [ "$port" = auto ] && port=$(cat "$dir/port")
    [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -gt 0 ] && [ "$port" -lt 65535 ] || die "bad port: $port"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if pid=$(running_pid "$dir"); then
        [ -f "$dir/port" ] && port=$(cat "$dir/port")
        ping_ok "$port" || die "server $pid in $dir does not answer on port $port"
        echo "http://127.0.0.1:$port"
        return 0
    fi
    local server
    server=$(find_server) || { install_server; server=$(find_server) || die "no clickhouse-server after install"; }
    ! ping_ok "$port" || die "port $port is already taken by another ClickHouse"
    write_config "$dir" "$port"
    echo "$port" >"$dir/port"
    # setsid: the server must not get the caller's signals (a test harness's Ctrl-C aside).
    setsid "$server" --config-file="$dir/config.xml" >"$dir/log/stdout.log" 2>&1 </dev/null &
    echo $! >"$dir/server.pid"
    local pid
    pid=$(cat "$dir/server.pid")
    for _ in $(seq 1 300); do
        if ping_ok "$port"; then
            echo "http://127.0.0.1:$port"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || {
            tail -n 20 "$dir/log/stdout.log" "$dir/log/clickhouse-server.err.log" >&2 2>/dev/null || true
            die "clickhouse-server exited during start (logs in $dir/log)"
        }
        sleep 0.1
    done
    die "clickhouse-server did not answer on port $port within 30 s (logs in $dir/log)"
}

stop() {
    local dir=$1 pid
    pid=$(running_pid "$dir") || { rm -f "$dir/server.pid"; return 0; }
    kill -TERM "$pid"
    for _ in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$dir/server.pid"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$dir/server.pid"
}

zookeeper_classpath() {
    # Debian's zookeeper package: the server jar and what it links (netty, slf4j, ...).
    ls /usr/share/java/*.jar | tr '\n' :
}

install_zookeeper() {
    echo "clickhouse.sh: ZooKeeper not found, installing it with apt-get" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq zookeeper >&2
}

zk_ok() (
    exec 2>/dev/null
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'ruok' >&3
    reply=$(timeout 2 cat <&3 || true)
    [ "$reply" = imok ]
)

free_port_from() {
    local port=$1 width=$2 i ok
    while [ "$port" -lt 29000 ]; do
        ok=1
        for i in $(seq 0 $((width - 1))); do
            port_free $((port + i)) || { ok=0; break; }
        done
        [ "$ok" = 1 ] && { echo "$port"; return 0; }
        port=$((port + width))
    done
    die "no $width free ports from $1"
}

zookeeper_start() {
    local dir=$1 port=$2
    mkdir -p "$dir/data"
    echo "$port" >"$dir/port"
    # forceSync=no: a test cluster's coordination need not survive a power cut, and an
    # fsync per transaction stalled behind other tests' disk writes expires sessions.
    cat >"$dir/zoo.cfg" <<EOF
tickTime=500
initLimit=10
syncLimit=5
dataDir=$dir/data
clientPort=$port
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok
maxClientCnxns=200
forceSync=no
EOF
    # A small heap: ZooKeeper holds a few thousand small nodes here.
    setsid java -Xmx256m -Dzookeeper.log.dir="$dir" -cp "$(zookeeper_classpath)" \
        org.apache.zookeeper.server.ZooKeeperServerMain "$dir/zoo.cfg" \
        >"$dir/zookeeper.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    for _ in $(seq 1 300); do
        zk_ok "$port" && return 0
        kill -0 "$(cat "$dir/pid")" 2>/dev/null || {
            tail -n 20 "$dir/zookeeper.log" >&2
            die "ZooKeeper exited during start (log: $dir/zookeeper.log)"
        }
        sleep 0.1
    done
    die "ZooKeeper did not answer on port $port within 30 s (log: $dir/zookeeper.log)"
}

cluster_start() {
    local dir=$1 shards=$2 replicas=$3
    [[ "$shards" =~ ^[1-9]$ && "$replicas" =~ ^[1-9]$ ]] || die "SHARDS and REPLICAS: 1 to 9"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    local s r port zk
    if [ -f "$dir/nodes" ]; then
        # Set up before: start what is not running.
        [ "$(cat "$dir/shape")" = "$shards $replicas" ] || die "$dir holds a cluster of another shape"
        zk=$(cat "$dir/zookeeper/port")
        zk_ok "$zk" || zookeeper_start "$dir/zookeeper" "$zk"
        while read -r s r port; do
            start "$dir/s${s}r${r}" "$port" >/dev/null
            echo "$s $r http://127.0.0.1:$port"
        done <"$dir/nodes"
        return 0
    fi
    ls /usr/share/java/zookeeper*.jar >/dev/null 2>&1 || install_zookeeper
    command -v java >/dev/null || die "ZooKeeper needs java (scripts/test.sh installs it)"
    zk=$(free_port_from 19181 1)
    zookeeper_start "$dir/zookeeper" "$zk"
    # Three ports per server: HTTP, native TCP, interserver (replication) HTTP.
    port=19200
    local nodes=()
    for s in $(seq 1 "$shards"); do
        for r in $(seq 1 "$replicas"); do
            port=$(free_port_from "$port" 3)
            nodes+=("$s $r $port")
            port=$((port + 3))
        done
    done
    printf '%s\n' "${nodes[@]}" >"$dir/nodes"
    echo "$shards $replicas" >"$dir/shape"
    local remote="" shard_xml ns nr np
    for s in $(seq 1 "$shards"); do
        shard_xml="<shard><internal_replication>true</internal_replication>"
        while read -r ns nr np; do
            [ "$ns" = "$s" ] || continue
            shard_xml+="<replica><host>127.0.0.1</host><port>$((np + 1))</port></replica>"
        done <"$dir/nodes"
        remote+="$shard_xml</shard>"
    done
    while read -r s r port; do
        mkdir -p "$dir/s${s}r${r}"
        cat >"$dir/s${s}r${r}/extra.xml" <<EOF
    <interserver_http_port>$((port + 2))</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <zookeeper><node><host>127.0.0.1</host><port>$zk</port></node><session_timeout_ms>10000</session_timeout_ms></zookeeper>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
    <macros><shard>s$s</shard><replica>r$r</replica></macros>
    <remote_servers><keywatch>$remote</keywatch></remote_servers>
EOF
    done <"$dir/nodes"
    while read -r s r port; do
        start "$dir/s${s}r${r}" "$port" >/dev/null
        echo "$s $r http://127.0.0.1:$port"
    done <"$dir/nodes"
}

cluster_stop() {
    local dir=$1 s r port pid
    [ -f "$dir/nodes" ] || return 0
    while read -r s r port; do
        stop "$dir/s${s}r${r}" &
    done <"$dir/nodes"
    wait
    if [ -f "$dir/zookeeper/pid" ]; then
        pid=$(cat "$dir/zookeeper/pid")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$dir/zookeeper/pid"
    fi
}

case "${1:-}" in
    start) [ $# -eq 3 ] || die "usage: $0 start DIR PORT"; start "$2" "$3" ;;
    stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
    url)
        [ $# -eq 2 ] || die "usage: $0 url DIR"
        running_pid "$2" >/dev/null || die "no server running in $2"
        echo "http://127.0.0.1:$(cat "$2/port")"
        ;;
    cluster-start)
        [ $# -eq 4 ] || die "usage: $0 cluster-start DIR SHARDS REPLICAS"
        cluster_start "$2" "$3" "$4"
        ;;
    cluster-stop) [ $# -eq 2 ] || die "usage: $0 cluster-stop DIR"; cluster_stop "$2" ;;
    *) die "usage: $0 start DIR PORT | stop DIR | url DIR | cluster-start DIR SHARDS REPLICAS | cluster-stop DIR" ;;
esac
