#!/usr/bin/env bash
# User-space instructions per state get through the runtime API (valgrind --tool=callgrind),
# repeatable on a noisy machine, unlike req/s.
#
# Setup: a redis-server on a free port; mecha (zero-config runtime, --concurrency 1) under
# callgrind with two components, `mem` (state.in-memory) and `red` (state.redis); one key saved
# in each. Then 2,000 warm-up gets, counters zeroed, N gets at 32 connections (h2load; over HTTP
# `GET /v1.0/state/STORE/k`, over gRPC `Dapr/GetState` with a pre-encoded request), counters
# dumped. Prints instructions per get and the top self-cost functions.
#
# Usage: benches/state-callgrind.sh [STORE=red|mem] [API=http|grpc] [N=5000]
#        (env: BIN=target/release/mecha, TOP=25, KEEP=1 keeps the work dir)
# Needs: valgrind, h2load (nghttp2-client), redis-server, curl, python3.
set -euo pipefail
STORE=${1:-red}; API=${2:-http}; N=${3:-5000}
BIN=${BIN:-target/release/mecha}; TOP=${TOP:-25}
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release --bin mecha" >&2; exit 1; }
source "$(dirname "$0")/../scripts/bench-lib.sh"
install_missing valgrind:valgrind h2load:nghttp2-client redis-server:redis-server curl:curl python3:python3
W=$(mktemp -d /tmp/mecha-state-cg.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT
B0=$((30000 + RANDOM % 10000)); RP=$B0; HP=$((B0 + 1)); GP=$((B0 + 2))
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$W" >/dev/null &
PIDS+=($!)
mkdir -p "$W/res"
printf 'apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: mem}\nspec:\n  type: state.in-memory\n  metadata: []\n' >"$W/res/mem.yaml"
printf 'apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: red}\nspec:\n  type: state.redis\n  metadata:\n  - {name: redisHost, value: "127.0.0.1:%s"}\n' "$RP" >"$W/res/red.yaml"
wait_port "$RP"
MECHA_DATA_DIR=$W valgrind --tool=callgrind --callgrind-out-file="$W/cg.out" --dump-instr=no "$BIN" run \
  --app-id bench --dapr-http-port "$HP" --dapr-grpc-port "$GP" --dapr-listen-address 127.0.0.1 \
  --resources-path "$W/res" --concurrency 1 -l warn 2>"$W/valgrind.err" &
VP=$!
PIDS+=($VP)
for _ in $(seq 1 150); do curl -sf -o /dev/null "http://127.0.0.1:$HP/v1.0/healthz" && break; sleep 0.2; done
curl -sf -XPOST -H 'content-type: application/json' \
  -d '[{"key":"k","value":"some value of moderate size"}]' "http://127.0.0.1:$HP/v1.0/state/$STORE"
if [ "$API" = grpc ]; then
  # GetStateRequest{1: store_name, 2: key}, length-prefixed.
  python3 - "$W/get.bin" "$STORE" <<'PY'
import sys
def f(tag, b): return bytes([tag << 3 | 2, len(b)]) + b
m = f(1, sys.argv[2].encode()) + f(2, b"k")
open(sys.argv[1], "wb").write(b"\0" + len(m).to_bytes(4, "big") + m)
PY
  load() { h2load -c32 -m1 -t1 -n "$1" -d "$W/get.bin" -H content-type:application/grpc -H te:trailers \
    "http://127.0.0.1:$GP/dapr.proto.runtime.v1.Dapr/GetState"; }
else
  load() { h2load --h1 -c32 -t1 -n "$1" "http://127.0.0.1:$HP/v1.0/state/$STORE/k"; }
fi
load 2000 >/dev/null
callgrind_control -z "$VP" >/dev/null
load "$N" | grep -E "^requests:"
callgrind_control -d "$VP" >/dev/null
F="$W/cg.out.1"
total=$(awk '/^summary:/ {print $2; exit}' "$F")
echo "$STORE get over $API: $((total / N)) instructions per request ($total for $N)"
callgrind_annotate --threshold=100 "$F" 2>/dev/null |
  awk -v n="$N" -v top="$TOP" '/^ *[0-9,]+ \(/ && !/\(100.0%\)/ {
    c=$1; gsub(",", "", c); sub(/^[^ ]+ +\([^)]*\) +/, ""); sub(/ \[.*$/, ""); sub(/^[^:]*:/, "");
    if (++k <= top) printf "  %8d  %s\n", c / n, $0 }'
[ -n "${KEEP:-}" ] && echo "callgrind files kept in $W"
true
