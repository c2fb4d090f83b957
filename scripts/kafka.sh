#!/usr/bin/env bash
# Apache Kafka for the tests and benchmarks: fetched with Maven, run on the machine's Java in
# KRaft mode (no ZooKeeper).
#
#   scripts/kafka.sh fetch            fetch the broker's jars into the cache (skipped when
#                                     present) and print the folder holding them
#   scripts/kafka.sh start DIR [PORT] format DIR and start a single-node broker+controller on
#                                     127.0.0.1:PORT (a free port when omitted); prints
#                                     host:port once it accepts connections
#   scripts/kafka.sh stop DIR         stop the broker started in DIR
#
# The cache is ~/.cache/keywatch/kafka-$KAFKA_VERSION (KEYWATCH_KAFKA_CACHE overrides it).
# tests/common/kafka.rs starts its brokers itself (with the same jars, through `fetch`); start
# and stop are for running keywatch, kcat or a benchmark by hand.
set -euo pipefail

KAFKA_VERSION=${KAFKA_VERSION:-4.4.0}
cache=${KEYWATCH_KAFKA_CACHE:-$HOME/.cache/keywatch/kafka-$KAFKA_VERSION}
java=${JAVA:-java}

fetch() {
    if [ -f "$cache/libs/.complete" ]; then
        echo "$cache/libs"
        return
    fi
    command -v mvn >/dev/null || { echo "mvn is required to fetch Apache Kafka" >&2; exit 1; }
    local work
    work=$(mktemp -d -t keywatch-kafka-fetch.XXXXXX)
    # Kafka's broker (kafka_2.13 holds kafka.Kafka and kafka.tools.StorageTool) plus the
    # log4j2 back end its bin/ scripts ship (and slf4j 2, which that back end binds to; Maven
    # would otherwise pick kafka's slf4j 1.7): without one the broker logs nothing at all.
    cat >"$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>keywatch</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId>
      <version>2.24.3</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>2.0.17</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>2.24.3</version>
    </dependency>
  </dependencies>
</project>
POM
    echo "fetching Apache Kafka $KAFKA_VERSION with Maven into $cache" >&2
    rm -rf "$cache/libs.tmp"
    mkdir -p "$cache"
    (cd "$work" && mvn -B -q dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$cache/libs.tmp") >&2
    rm -rf "$work"
    touch "$cache/libs.tmp/.complete"
    rm -rf "$cache/libs"
    mv "$cache/libs.tmp" "$cache/libs"
    echo "$cache/libs"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start() {
    local dir=$1 port=${2:-} libs
    [ -n "$port" ] || port=$(free_port)
    local cport
    cport=$(free_port)
    libs=$(fetch)
    mkdir -p "$dir/data"
    cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
group.initial.rebalance.delay.ms=0
PROPS
    cat >"$dir/log4j2.properties" <<LOG
appender.file.type = File
appender.file.name = file
appender.file.fileName = $dir/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
LOG
    "$java" -cp "$libs/*" kafka.tools.StorageTool format --standalone \
        -t "$(python3 -c 'import uuid,base64; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')" \
        -c "$dir/server.properties" >"$dir/format.log" 2>&1
    # KAFKA_HEAP: the JVM heap options (a benchmark moving a gigabyte wants more).
    # shellcheck disable=SC2086
    nohup "$java" ${KAFKA_HEAP:--Xmx512m} -XX:+UseG1GC -Dlog4j2.configurationFile="$dir/log4j2.properties" \
        -cp "$libs/*" kafka.Kafka "$dir/server.properties" >"$dir/stdout.log" 2>&1 &
    echo $! >"$dir/pid"
    for _ in $(seq 1 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "127.0.0.1:$port"
            return
        fi
        kill -0 "$(cat "$dir/pid")" 2>/dev/null || { tail -n 30 "$dir/stdout.log" "$dir/server.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "kafka did not start in 60 s; see $dir/server.log" >&2
    exit 1
}

stop() {
    local dir=$1
    [ -f "$dir/pid" ] || return 0
    local pid
    pid=$(cat "$dir/pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/pid"
}

case "${1:-}" in
    fetch) fetch ;;
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    *) echo "usage: $0 fetch | start DIR [PORT] | stop DIR" >&2; exit 2 ;;
esac
