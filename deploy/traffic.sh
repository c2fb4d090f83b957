#!/usr/bin/env bash
# The docker-compose stack's traffic generator: a Kong access log that Vector tails.
#
# 1. History: `keywatch sample` (four days of six clients, acme-billing rotating key A to
#    key B with two hosts still on A), its times shifted so that the log ends now.
# 2. The key registry for keywatch (deploy/keys.toml) with the same shift applied to its
#    times, so that the rotation's start and deadline match the shifted traffic.
# 3. Live traffic: RATE lines a second from the sample's last day, stamped with the time
#    they are written, forever.
#
# Environment: LOG (the access log), REGISTRY_IN, REGISTRY_OUT, LINES, SEED, RATE.
set -euo pipefail

LOG=${LOG:-/var/log/gateway/access.log}
REGISTRY_IN=${REGISTRY_IN:-/demo/keys.toml}
REGISTRY_OUT=${REGISTRY_OUT:-/etc/keywatch/registry/keys.toml}
LINES=${LINES:-20000}
SEED=${SEED:-1}
RATE=${RATE:-5}
KEYWATCH=${KEYWATCH:-keywatch}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$KEYWATCH" sample --preset kong --lines "$LINES" --seed "$SEED" -o "$work/sample.log"

started_at() { sed -n 's/.*"started_at":\([0-9]*\).*/\1/p' | head -n1; }
last_ms=$(tail -n1 "$work/sample.log" | started_at)
now_ms=$(date +%s%3N)
shift_ms=$((now_ms - last_ms))
shift_s=$((shift_ms / 1000))

# The registry first: keywatch waits for it (its healthcheck).
mkdir -p "$(dirname "$REGISTRY_OUT")"
while IFS= read -r line; do
    if [[ $line =~ ^([a-z_]+)\ =\ \"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]+Z)\"(.*)$ ]]; then
        t=$(date -u -d "${BASH_REMATCH[2]}" +%s)
        line="${BASH_REMATCH[1]} = \"$(date -u -d "@$((t + shift_s))" +%Y-%m-%dT%H:%M:%SZ)\"${BASH_REMATCH[3]}"
    fi
    printf '%s\n' "$line"
done <"$REGISTRY_IN" >"$REGISTRY_OUT.tmp"
mv "$REGISTRY_OUT.tmp" "$REGISTRY_OUT"
echo "traffic: registry written to $REGISTRY_OUT (times shifted by ${shift_s} s)"

# History, unless this log already has it (a restart of the generator).
mkdir -p "$(dirname "$LOG")"
if [ ! -s "$LOG" ]; then
    awk -v d="$shift_ms" '{
        if (match($0, /"started_at":[0-9]+/)) {
            t = substr($0, RSTART + 13, RLENGTH - 13) + d
            $0 = substr($0, 1, RSTART - 1) "\"started_at\":" sprintf("%.0f", t) substr($0, RSTART + RLENGTH)
        }
        print
    }' "$work/sample.log" >>"$LOG"
    echo "traffic: $LINES lines of history written to $LOG"
fi
touch "$work/ready"

# Live: the last quarter of the sample (the rotation as it stands), round and round.
tail -n $((LINES / 4)) "$work/sample.log" >"$work/live.log"
total=$(wc -l <"$work/live.log")
i=1
while :; do
    now=$(date +%s%3N)
    end=$((i + RATE - 1))
    sed -n "${i},${end}p" "$work/live.log" \
        | sed "s/\"started_at\":[0-9]*/\"started_at\":$now/" >>"$LOG"
    i=$((end + 1))
    [ "$i" -le "$total" ] || i=1
    sleep 1
done
