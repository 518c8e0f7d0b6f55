#!/usr/bin/env bash
# Instructions per request of mecha (valgrind --tool=callgrind), repeatable on a noisy machine:
#   hop     one plain proxy route: h2load -> mecha (route to nginx) -> nginx
#   invokeA sidecar A of an invocation: /v1.0/invoke/b/method/x -> (no route) cluster b -> sidecar B
#   invokeB sidecar B of an invocation: /v1.0/invoke/b/method/x -> its app (nginx)
# The process under callgrind is warmed up (W requests), its counters zeroed (callgrind_control -z),
# then N requests run over one keep-alive HTTP/1.1 connection and the counters are dumped; the
# figure is the dumped total divided by N. The other sidecar and nginx run natively.
# Usage: benches/runtime-callgrind.sh [N=2000] [W=200]; needs a release build (BIN=… for another),
# valgrind, h2load, nginx.
set -euo pipefail
N=${1:-2000}; WARM=${2:-200}
BIN=${BIN:-target/release/mecha}
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null; rm -rf "$W"' EXIT
B0=$((30000 + RANDOM % 10000)); NP=$B0; AP=$((B0 + 1)); HP=$((B0 + 2)); BH=$((B0 + 3)); AG=$((B0 + 4)); BG=$((B0 + 5))
cat > "$W/nginx.conf" <<NGINX
worker_processes 1; daemon on; pid $W/nginx.pid; error_log $W/nginx.err;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $W; proxy_temp_path $W; fastcgi_temp_path $W;
  uwsgi_temp_path $W; scgi_temp_path $W;
  server { listen 127.0.0.1:$NP; location / { return 200 "ok"; } location = /dapr/subscribe { return 404; } } }
NGINX
nginx -c "$W/nginx.conf" -p "$W"
# ep, hcm and RTF build the config below.
source "$(dirname "$0")/../scripts/bench-lib.sh"
{
  echo "static_resources:"; echo "  listeners:"
  echo "  - name: api"; echo "    address: { socket_address: { address: 127.0.0.1, port_value: $HP } }"; hcm api "" "$RTF"
  echo "  - name: toapp"; echo "    address: { socket_address: { address: 127.0.0.1, port_value: $AP } }"; hcm toapp '{ match: { prefix: "/" }, route: { cluster: app } }' ""
  echo "  clusters:"
  echo "  - name: app"; echo "    type: STATIC"; echo "    $(ep app "$NP")"
  echo "  - name: b"; echo "    type: STATIC"; echo "    $(ep b "$BH")"
} > "$W/a.yaml"
mkdir -p "$W/b"
A=("$BIN" run -c "$W/a.yaml" --app-id a --dapr-grpc-port "$AG" --dapr-listen-address 127.0.0.1 --concurrency 1 -l warn)
B=("$BIN" run --app-id b --app-port "$NP" --dapr-http-port "$BH" --dapr-grpc-port "$BG" --dapr-listen-address 127.0.0.1 --concurrency 1 -l warn)
CG=(valgrind --tool=callgrind --callgrind-out-file="$W/cg.%p" --dump-instr=no --collect-atstart=yes)

wait_up() { for _ in $(seq 1 600); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "not up: $1" >&2; exit 1; }

measure() { # label url pid
  local label=$1 url=$2 pid=$3
  h2load --h1 -n "$WARM" -c 1 "$url" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  h2load --h1 -n "$N" -c 1 "$url" > "$W/h2load.log"
  grep -q "succeeded, 0 failed" <(grep "requests:" "$W/h2load.log") || { cat "$W/h2load.log" >&2; exit 1; }
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 1
  local f; f=$(ls -t "$W"/cg.$pid.* | head -1)
  local total; total=$(grep -E '^(summary|totals):' "$f" | head -1 | awk '{print $2}')
  printf '%-10s %12d instructions/request  (%s requests, %s)\n' "$label" $((total / N)) "$N" "$url"
  # KEEP=dir keeps the dumps. Read them with `callgrind_annotate --threshold=100 FILE`: with the
  # default threshold it prints only the first entry, which the dump charges with the whole total.
  if [ -n "${KEEP:-}" ]; then cp "$f" "$KEEP/$label.callgrind"; fi
  rm -f "$W"/cg.$pid.*
}

# hop and invokeA: sidecar A under callgrind, B native.
MECHA_DATA_DIR="$W/b" "${B[@]}" & wait_up "http://127.0.0.1:$BH/v1.0/healthz"
"${CG[@]}" "${A[@]}" 2>"$W/a.err" & CGA=$!
wait_up "http://127.0.0.1:$HP/v1.0/healthz"
APID=$(pgrep -f "callgrind.*$W/a.yaml" | head -1)
measure hop "http://127.0.0.1:$AP/x" "$APID"
measure invokeA "http://127.0.0.1:$HP/v1.0/invoke/b/method/x" "$APID"
kill "$CGA"; kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
# invokeB: sidecar B under callgrind.
MECHA_DATA_DIR="$W/b" "${CG[@]}" "${B[@]}" 2>"$W/b.err" & CGB=$!
wait_up "http://127.0.0.1:$BH/v1.0/healthz"
BPID=$(pgrep -f "callgrind.*--app-id b" | head -1)
measure invokeB "http://127.0.0.1:$BH/v1.0/invoke/b/method/x" "$BPID"
kill "$CGB" 2>/dev/null || true
