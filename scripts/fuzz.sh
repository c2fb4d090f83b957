#!/usr/bin/env bash
# Fuzzes keywatch's parsers of outside input (fuzz/, FUZZING.md) with cargo fuzz.
#
#   scripts/fuzz.sh seed                 writes the seed corpora (fuzz/seeds/) from the samples
#   scripts/fuzz.sh smoke [SECONDS]      every target for SECONDS (default 5): what scripts/test.sh runs
#   scripts/fuzz.sh run TARGET SECONDS   one long run (FUZZ_JOBS=N for N processes)
#   scripts/fuzz.sh long SECONDS         every target for SECONDS each, one after the other
#   scripts/fuzz.sh list                 the targets
#
# Needs cargo-fuzz (crates.io) and a nightly toolchain (rustup): installed here when missing.
# Each run keeps what it learned in fuzz/corpus/TARGET (not in git) on top of the seeds in
# fuzz/seeds/TARGET; a crash is written to fuzz/artifacts/TARGET/ and fails the run. Every
# run appends "target seconds exit-code" to fuzz/runs.log, from which FUZZING.md's hours
# are summed (`scripts/fuzz.sh hours`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
# The fuzz build (keywatch and its dependencies in release, with coverage) is kept outside
# the checkout, so that a fresh checkout on the same machine (CI) does not build it again.
export CARGO_TARGET_DIR="${KEYWATCH_FUZZ_TARGET:-$HOME/.cache/keywatch/fuzz-target}"
# Incremental: after a change to keywatch only its changed parts are compiled again (the
# dependencies are not incremental either way); a full release build of keywatch with the
# coverage instrumentation is minutes on a 2-core machine, and CI does one after every change.
export CARGO_PROFILE_RELEASE_INCREMENTAL=true

tools() {
    if ! rustup toolchain list | grep -q '^nightly'; then
        echo "installing a nightly toolchain (cargo fuzz needs -Z flags) with rustup"
        rustup toolchain install nightly --profile minimal
    fi
    if ! command -v cargo-fuzz >/dev/null; then
        echo "installing cargo-fuzz from crates.io"
        cargo install cargo-fuzz --locked
    fi
}

targets() { sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^keywatch-fuzz$'; }

# Builds every target once (release, debug assertions on). No AddressSanitizer: librdkafka's
# configure cannot link the ASan-instrumented zstd it builds against, and the code under
# test is safe Rust (a panic, an overflow or a failed assertion is what we look for).
build() { (cd fuzz && cargo +nightly fuzz build -O --debug-assertions --sanitizer none); }

run_one() {
    local target=$1 seconds=$2 jobs=${FUZZ_JOBS:-1} rc=0
    mkdir -p "fuzz/corpus/$target" "fuzz/seeds/$target"
    # -rss_limit_mb: a target that needs more memory than this for one input is a finding.
    (cd fuzz && cargo +nightly fuzz run -O --debug-assertions --sanitizer none "$target" \
        "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 \
        $([ "$jobs" -gt 1 ] && echo "-jobs=$jobs -workers=$jobs")) || rc=$?
    # Smoke runs are not counted in the hours.
    [ -n "${FUZZ_NO_LOG:-}" ] || echo "$target $((seconds * jobs)) $rc $(date -u +%FT%TZ)" >>fuzz/runs.log
    return $rc
}

seed() {
    local d=fuzz/seeds kw=${KEYWATCH:-target/debug/keywatch}
    [ -x "$kw" ] || cargo build --bin keywatch
    rm -rf "$d" && mkdir -p "$d"/{decode,fingerprint_leak,timestamps,lifecycle,config_main,config_registry,config_policy,config_routes,score_csv,templates,channel_answers,telegram_slack_answers}
    # decode: the first byte picks the decoder (fuzz/src/lib.rs: presets in PRESETS order).
    local i=0
    for p in kong tyk traefik envoy nginx aws-apigw; do
        "$kw" sample --preset "$p" --lines 40 --seed 7 | head -n 12 | while IFS= read -r line; do
            { printf "\\x$(printf %02x $i)"; printf '%s' "$line"; } >"$d/decode/$p-$(printf %s "$line" | sha1sum | cut -c1-12)"
        done
        i=$((i + 1))
    done
    # A Kong batch, and the generic mapping (decoder 6).
    { printf '\x00['; "$kw" sample --preset kong --lines 3 --seed 3 | paste -sd, | tr -d '\n'; printf ']'; } >"$d/decode/kong-batch"
    printf '\x06%s' '{"t":"2024-01-01T00:00:00.5Z","auth":{"id":"k1"},"creds":{"token":"tok_0123456789"},"who":[{"name":"c"}],"net":{"ip":"10.0.0.1:443"},"ua":"curl","req":{"method":"GET","path":"/v1/a/123?x=1"},"route":{"name":"r"},"res":{"status":"401","took":0.25},"err":"invalid key","gw":"g","id":"r1"}' >"$d/decode/json-mapping"
    head -n 3 examples/gateway.log | while IFS= read -r line; do printf '\x00%s' "$line" >"$d/decode/example-$(printf %s "$line" | sha1sum | cut -c1-12)"; done
    # fingerprint_leak: arbitrary bytes; a few plain keys.
    for k in sk_live_0123456789abcdef 'Bearer abc.def.ghi' 'k"e\y_0123456789'; do printf '%s' "$k" >"$d/fingerprint_leak/$(printf %s "$k" | sha1sum | cut -c1-12)"; done
    for t in 2024-01-01T00:00:00Z 2024-02-29T23:59:60.999+14:00 '10/Oct/2000:13:55:36 -0700' 1704067200 1704067200123 1704067200123456789 '2024-01-01 00:00:00.123456'; do
        printf '%s' "$t" >"$d/timestamps/$(printf %s "$t" | sha1sum | cut -c1-12)"
    done
    grep -ho '{\\\?"type\\\?".*}' tests/it/lifecycle.rs src/registry/lifecycle.rs | sed 's/\\"/"/g; s/{{/{/g; s/}}/}/g' | head -n 20 | while IFS= read -r line; do
        printf '%s' "$line" >"$d/lifecycle/$(printf %s "$line" | sha1sum | cut -c1-12)"
    done
    cp examples/keywatch.toml "$d/config_main/examples.toml"; cp deploy/keywatch.toml "$d/config_main/deploy.toml"
    cp examples/registry.toml "$d/config_registry/examples.toml"; cp deploy/keys.toml "$d/config_registry/deploy.toml"
    cp rules/policy.toml "$d/config_policy/"
    cp rules/routes.toml "$d/config_routes/rules.toml"; cp deploy/routes.toml "$d/config_routes/deploy.toml"
    printf 'timestamp,value\n2014-04-10 07:15:00,1\n2014-04-10 07:20:00,2.5\n2014-04-10 07:25:00,100\n' >"$d/score_csv/small.csv"
    python3 -c 'import random; random.seed(1); print("timestamp,value"); [print(f"2014-04-{10+i//288:02d} {(i%288)*5//60:02d}:{(i%288)*5%60:02d}:00,{random.gauss(50,5) if i!=500 else 400:.2f}") for i in range(600)]' >"$d/score_csv/series.csv"
    for f in templates channel_answers telegram_slack_answers; do head -c 256 /dev/urandom >"$d/$f/random"; done
    printf '\x02\x00\x00\x005000\x00\x00\x00<script>alert(1)</script>&amp;`x`' >"$d/templates/markup"
    echo "seeds: $(find "$d" -type f | wc -l) files in $d"
}

case "${1:-}" in
list) targets ;;
seed) seed ;;
smoke)
    tools
    build
    for t in $(targets); do FUZZ_NO_LOG=1 run_one "$t" "${2:-5}"; done
    ;;
run)
    tools
    run_one "$2" "$3"
    ;;
long)
    tools
    build
    for t in $(targets); do run_one "$t" "$2" || true; done
    ;;
hours)
    awk '{s[$1] += $2} END {for (t in s) printf "%-18s %7.2f h\n", t, s[t] / 3600}' fuzz/runs.log | sort
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
