#!/usr/bin/env bash
# User-space instructions per proxied HTTP/1.1 request, for mecha and (as the yardstick) nginx,
# counted by valgrind's callgrind: repeatable to ~0.5 % whatever else the machine is doing, unlike
# req/s on a shared 2-core box. Kernel work (syscalls) is not counted; both proxies make the same
# syscalls per request (two reads, two writes), so the difference is user-space cost.
#
# Setup: an upstream nginx (`return 200 "ok\n"`), the proxy under callgrind with one worker, a
# warm-up of 2,000 requests, counters zeroed, then N requests over 64 keep-alive connections
# (`h2load --h1`), counters dumped. Prints Ir per request and the top self-cost functions.
#
# Usage: scripts/callgrind-request.sh [N]   (env: MECHA_BIN=target/release/mecha, NGINX=1 to
#        also measure nginx, RESIL=1 for the resilience config, H2=1 for h2c downstream, TOP=25, KEEP=1 keeps the work dir with the callgrind files)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
N="${1:-5000}"
TOP="${TOP:-25}"
MECHA_BIN="${MECHA_BIN:-$ROOT/target/release/mecha}"
BASE_PORT="${BASE_PORT:-19180}"
UP=$BASE_PORT
PX=$((BASE_PORT + 1))
ADMIN=$((BASE_PORT + 2))

need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || need+=(nginx)
command -v python3 >/dev/null || need+=(python3)
if ((${#need[@]})); then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -x "$MECHA_BIN" ] || { echo "no $MECHA_BIN: cargo build --release --bin mecha" >&2; exit 1; }

WORK="$(mktemp -d /tmp/mecha-cg.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

wait_http() { # PORT [curl option]
  for _ in $(seq 1 300); do
    curl -fs ${2:-} -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.1
  done
  echo "port $1 did not answer" >&2
  return 1
}

# RESIL=1: the route and cluster of benches/resilience-load.sh's "resil" config (retry policy with
# per-try timeout and previous-hosts predicate, circuit breakers with track_remaining, outlier
# detection), configured but never triggered.
ROUTE_EXTRA=""
CLUSTER_EXTRA=""
if [ -n "${RESIL:-}" ]; then
  ROUTE_EXTRA="                  retry_policy:
                    retry_on: 5xx,reset,connect-failure
                    num_retries: 3
                    per_try_timeout: 5s
                    retry_host_predicate: [{ name: envoy.retry_host_predicates.previous_hosts }]
                    host_selection_retry_max_attempts: 3"
  CLUSTER_EXTRA="    circuit_breakers:
      thresholds: [{ max_requests: 100000, max_retries: 1000, track_remaining: true }]
    outlier_detection: { consecutive_5xx: 5, interval: 1s, base_ejection_time: 30s }"
fi

cat >"$WORK/up.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/up.pid;
error_log $WORK/up.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:$UP backlog=4096; location / { return 200 "ok\n"; } } }
EOF
cat >"$WORK/px.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $WORK/px.pid;
error_log $WORK/px.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  upstream up { server 127.0.0.1:$UP; keepalive 1024; keepalive_requests 100000000; }
  server { listen 127.0.0.1:$PX backlog=4096;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
cat >"$WORK/mecha.yaml" <<EOF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $ADMIN } }
static_resources:
  listeners:
  - name: bench
    address: { socket_address: { address: 127.0.0.1, port_value: $PX } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route:
                  cluster: up
$ROUTE_EXTRA
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 1s
$CLUSTER_EXTRA
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $UP } } }
EOF

# H2=1: HTTP/2 cleartext (prior knowledge) from the load generator, 16 connections x 10 streams
# (the load bench's h2-sat shape); upstream connections stay HTTP/1.1.
if [ -n "${H2:-}" ]; then
  LOAD=(-c 16 -m 10)
  sed -i "s/listen 127.0.0.1:$PX backlog=4096;/listen 127.0.0.1:$PX http2 backlog=4096;/" "$WORK/px.conf"
else
  LOAD=(--h1 -c 64)
fi

nginx -p "$WORK" -c "$WORK/up.conf" >/dev/null 2>&1 &
PIDS+=($!)
wait_http "$UP"

# measure LABEL CMD...: runs CMD under callgrind on port $PX and reports Ir per request.
measure() {
  local label=$1
  shift
  valgrind --tool=callgrind --compress-strings=no --callgrind-out-file="$WORK/cg-$label.out" \
    "$@" >"$WORK/$label.log" 2>&1 &
  local vp=$!
  PIDS+=($vp)
  wait_http "$PX" "${H2:+--http2-prior-knowledge}"
  h2load "${LOAD[@]}" -n 2000 "http://127.0.0.1:$PX/" >/dev/null
  callgrind_control -z "$vp" >/dev/null
  h2load "${LOAD[@]}" -n "$N" "http://127.0.0.1:$PX/" | grep -E '^requests:' >&2
  callgrind_control -d "$vp" >/dev/null
  sleep 1
  kill "$vp" 2>/dev/null || true
  wait "$vp" 2>/dev/null || true
  python3 - "$WORK/cg-$label.out.1" "$N" "$TOP" "$label" <<'EOF'
import collections, re, sys
path, n, top, label = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
names, cost = {}, collections.Counter()
def name(s):
    m = re.match(r'\((\d+)\)(?: (.*))?', s.strip())
    if not m:
        return s.strip()
    if m.group(2):
        names[m.group(1)] = m.group(2)
    return names.get(m.group(1), s)
fn, after_call = None, False
for line in open(path, errors='replace'):
    line = line.rstrip('\n')
    if line.startswith('fn='):
        fn = name(line[3:])
    elif line.startswith('cfn='):
        name(line[4:])
    elif line.startswith('calls='):
        after_call = True
    elif line and (line[0].isdigit() or line[0] in '+-*'):
        parts = line.split()
        if not after_call and len(parts) >= 2:
            cost[fn] += int(parts[1])
        after_call = False
total = sum(cost.values())
print(f"{label}: {total // n} instructions per request ({total} for {n} requests)")
for f, c in cost.most_common(top):
    print(f"  {c / n:8.0f}  {100 * c / total:5.1f}%  {f[:140]}")
EOF
}

measure mecha "$MECHA_BIN" run -c "$WORK/mecha.yaml" --concurrency 1 --log-level warn
if [ -n "${NGINX:-}" ]; then
  measure nginx nginx -p "$WORK" -c "$WORK/px.conf"
fi
