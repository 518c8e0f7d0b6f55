#!/usr/bin/env bash
# Profile-guided release build of mecha: target/pgo/release/mecha.
#
# Why: on a proxied request mecha's hot path runs through ~100 KB of distinct code (callgrind
# with a 64 KiB simulated cache: ~1,600 instruction-cache line misses per request), so the CPU
# stalls on instruction fetch more than nginx does. With a profile, LLVM lays the hot code out
# together, inlines by measured call counts and moves cold branches out of the way.
#
# Steps: (1) an instrumented release build (`-Cprofile-generate`) in target/pgo-gen; (2) a short
# training run with it: HTTP/1.1 and h2c proxying to an nginx upstream, and the runtime API
# (state get and save, a `state.redis` get, invocation through two sidecars); (3) `llvm-profdata
# merge`; (4) the release build with `-Cprofile-use` in target/pgo. About twenty minutes on two
# cores.
#
# Needs: llvm-profdata matching rustc's LLVM (`rustup component add llvm-tools`, installed here
# when missing), nginx, wrk, h2load, redis-server (apt-get install nginx wrk nghttp2-client
# redis-server when missing).
# Usage: scripts/pgo-build.sh   (env: TRAIN_S=6 seconds per training load)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TRAIN_S="${TRAIN_S:-6}"
log() { printf '== %s\n' "$*" >&2; }

source "$ROOT/scripts/bench-lib.sh"
install_missing nginx:nginx wrk:wrk h2load:nghttp2-client curl:curl redis-server:redis-server
SYSROOT="$(rustc --print sysroot)"
HOST="$(rustc -vV | sed -n 's/^host: //p')"
PROFDATA="$SYSROOT/lib/rustlib/$HOST/bin/llvm-profdata"
if [ ! -x "$PROFDATA" ]; then
  command -v rustup >/dev/null || {
    echo "no llvm-profdata at $PROFDATA, and no rustup to install it (llvm-tools)" >&2
    exit 1
  }
  log "rustup component add llvm-tools"
  rustup component add llvm-tools >&2
fi
[ -x "$PROFDATA" ] || { echo "no llvm-profdata at $PROFDATA" >&2; exit 1; }

WORK="$(mktemp -d /tmp/mecha-pgo.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/train" "$WORK/b"

log "instrumented build (target/pgo-gen)"
# A fixed path keeps RUSTFLAGS the same between runs, so cargo reuses the instrumented crates.
RUSTFLAGS="-Cprofile-generate=$ROOT/target/pgo-gen/profraw" cargo build --release --bin mecha --target-dir target/pgo-gen >&2
GEN=target/pgo-gen/release/mecha

P=$((21000 + RANDOM % 8000))
UP=$P; PX=$((P + 1)); API=$((P + 2)); AG=$((P + 3)); BH=$((P + 4)); BG=$((P + 5)); RP=$((P + 6))
cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1; daemon on; pid $WORK/nginx.pid; error_log $WORK/nginx.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 100000000;
  client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK; uwsgi_temp_path $WORK; scgi_temp_path $WORK;
  server { listen 127.0.0.1:$UP; location / { return 200 "ok\n"; } location = /dapr/subscribe { return 404; } } }
NGINX
nginx -c "$WORK/nginx.conf" -p "$WORK"
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >/dev/null &
PIDS+=($!)

{
  echo "static_resources:"; echo "  listeners:"
  echo "  - name: proxy"; echo "    address: { socket_address: { address: 127.0.0.1, port_value: $PX } }"
  hcm proxy '{ match: { prefix: "/" }, route: { cluster: up } }' ""
  echo "  - name: api"; echo "    address: { socket_address: { address: 127.0.0.1, port_value: $API } }"
  hcm api "" "$RTF"
  echo "  clusters:"
  echo "  - name: up"; echo "    type: STATIC"; echo "    $(ep up "$UP")"
  echo "  - name: b"; echo "    type: STATIC"; echo "    $(ep b "$BH")"
} > "$WORK/a.yaml"
mkdir -p "$WORK/res"
printf 'apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: mem}\nspec:\n  type: state.in-memory\n  version: v1\n' > "$WORK/res/mem.yaml"
printf 'apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: red}\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - {name: redisHost, value: "127.0.0.1:%s"}\n' "$RP" > "$WORK/res/red.yaml"
wait_port "$RP"

log "training run (${TRAIN_S}s per load)"
# Build scripts compiled with the same flags also write profiles (to the default path); only
# mecha's count.
export LLVM_PROFILE_FILE="$WORK/train/mecha-%p-%m.profraw"
"$GEN" run -c "$WORK/a.yaml" --app-id a --dapr-grpc-port "$AG" --resources-path "$WORK/res" --concurrency 1 -l warn &
PIDS+=($!)
MECHA_DATA_DIR="$WORK/b" "$GEN" run --app-id b --app-port "$UP" --dapr-http-port "$BH" --dapr-grpc-port "$BG" \
  --dapr-listen-address 127.0.0.1 --concurrency 1 -l warn &
PIDS+=($!)
wait_port "$PX"; wait_port "$API"; wait_port "$BH"
for st in mem red; do
  curl -sf -XPOST -H 'content-type: application/json' -d '[{"key":"k","value":"some value"}]' "http://127.0.0.1:$API/v1.0/state/$st" >/dev/null
done
curl -sf "http://127.0.0.1:$API/v1.0/invoke/b/method/x" | grep -q ok || { echo "training: invocation failed" >&2; exit 1; }
printf 'wrk.method="POST"\nwrk.body="[{\\"key\\":\\"k\\",\\"value\\":\\"v\\"}]"\nwrk.headers["Content-Type"]="application/json"\n' > "$WORK/save.lua"
wrk -t1 -c64 -d"${TRAIN_S}s" "http://127.0.0.1:$PX/" >/dev/null
h2load -c16 -m10 -D"$TRAIN_S" "http://127.0.0.1:$PX/" >/dev/null
wrk -t1 -c1 -d"${TRAIN_S}s" "http://127.0.0.1:$PX/" >/dev/null
wrk -t1 -c32 -d"${TRAIN_S}s" "http://127.0.0.1:$API/v1.0/state/mem/k" >/dev/null
wrk -t1 -c32 -d"${TRAIN_S}s" "http://127.0.0.1:$API/v1.0/state/red/k" >/dev/null
wrk -t1 -c32 -d"${TRAIN_S}s" -s "$WORK/save.lua" "http://127.0.0.1:$API/v1.0/state/mem" >/dev/null
wrk -t1 -c8 -d"${TRAIN_S}s" "http://127.0.0.1:$API/v1.0/invoke/b/method/x" >/dev/null
# The profile is written when the process exits normally (SIGTERM drains, then returns).
for p in "${PIDS[@]}"; do kill -TERM "$p"; done
for p in "${PIDS[@]}"; do wait "$p" || true; done
PIDS=()
unset LLVM_PROFILE_FILE
ls "$WORK"/train/*.profraw >/dev/null 2>&1 || { echo "training wrote no profile" >&2; exit 1; }
mkdir -p target/pgo
"$PROFDATA" merge -o target/pgo/mecha.profdata "$WORK"/train/*.profraw

log "optimized build with the profile (target/pgo)"
RUSTFLAGS="-Cprofile-use=$ROOT/target/pgo/mecha.profdata" cargo build --release --bin mecha --target-dir target/pgo >&2
log "built target/pgo/release/mecha"
