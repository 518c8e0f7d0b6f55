#!/usr/bin/env bash
# Resilience overhead benchmark (issue 4): the same upstream behind two mecha processes in the same
# run — "plain" (route + cluster only) and "resil" (retry_policy with per-try timeout and
# previous-hosts predicate, circuit breakers with track_remaining, outlier detection, all
# configured but never triggered) — HTTP/1.1 keep-alive at saturation with wrk.
# Rounds alternate plain/resil to cancel drift; reported: req/s and p99 per round, the median
# per config, and resil/plain. Target: resil within 5 % of plain.
#
# Usage: benches/resilience-load.sh   (env: DURATION=10 CONNS=64 ROUNDS=3 PROXY_CPU=0 LOAD_CPU=1
#                                      SKIP_BUILD=1 BASE_PORT=19080)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DURATION="${DURATION:-10}"
CONNS="${CONNS:-64}"
ROUNDS="${ROUNDS:-3}"
PROXY_CPU="${PROXY_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"
BASE_PORT="${BASE_PORT:-19080}"
UP_PORT=$BASE_PORT
PLAIN_PORT=$((BASE_PORT + 1))
PLAIN_ADMIN=$((BASE_PORT + 2))
RESIL_PORT=$((BASE_PORT + 3))
RESIL_ADMIN=$((BASE_PORT + 4))

log() { printf '== %s\n' "$*" >&2; }
for t in wrk nginx taskset; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install wrk nginx util-linux)" >&2; exit 1; }
done
if [ -z "${SKIP_BUILD:-}" ]; then
  log "cargo build --release"
  (cd "$ROOT" && cargo build --release --bin mecha >&2)
fi
MECHA="$ROOT/target/release/mecha"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

# Upstream: nginx, one worker, `return 200`.
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  fastcgi_temp_path $WORK/nginx;
  uwsgi_temp_path $WORK/nginx;
  scgi_temp_path $WORK/nginx;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP_PORT; location / { return 200 "ok\n"; } }
}
EOF
taskset -c "$LOAD_CPU" nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
PIDS+=($!)

config() { # name port admin route_extra cluster_extra
  cat <<EOF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $3 } }
static_resources:
  listeners:
  - name: $1
    address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route:
                  cluster: up
$4
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 1s
$5
    load_assignment:
      cluster_name: up
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $UP_PORT } } } }] }]
EOF
}
config plain "$PLAIN_PORT" "$PLAIN_ADMIN" "" "" >"$WORK/plain.yaml"
config resil "$RESIL_PORT" "$RESIL_ADMIN" \
"                  retry_policy:
                    retry_on: 5xx,reset,connect-failure
                    num_retries: 3
                    per_try_timeout: 5s
                    retry_host_predicate: [{ name: envoy.retry_host_predicates.previous_hosts }]
                    host_selection_retry_max_attempts: 3" \
"    circuit_breakers:
      thresholds: [{ max_requests: 100000, max_retries: 1000, track_remaining: true }]
    outlier_detection: { consecutive_5xx: 5, interval: 1s, base_ejection_time: 30s }" >"$WORK/resil.yaml"

for c in plain resil; do
  taskset -c "$PROXY_CPU" "$MECHA" run -c "$WORK/$c.yaml" --concurrency 1 --log-level warn &
  PIDS+=($!)
done
for p in "$PLAIN_ADMIN" "$RESIL_ADMIN"; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$p/ready" >/dev/null && break; sleep 0.1; done
done
for port in "$PLAIN_PORT" "$RESIL_PORT"; do
  curl -sf "http://127.0.0.1:$port/" >/dev/null || { echo "proxy on $port not serving" >&2; exit 1; }
done

run() { # port -> "rps p99_ms"
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$1/" |
    awk '/Requests\/sec/ {rps=$2} /^ +99%/ {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; p99=v} END {printf "%.0f %.2f\n", rps, p99}'
}
log "warm-up"
run "$PLAIN_PORT" >/dev/null; run "$RESIL_PORT" >/dev/null
declare -a P R
printf '%-6s %-6s %12s %10s\n' round config req/s p99_ms
for i in $(seq "$ROUNDS"); do
  read -r prps pp99 < <(run "$PLAIN_PORT"); P+=("$prps")
  printf '%-6s %-6s %12s %10s\n' "$i" plain "$prps" "$pp99"
  read -r rrps rp99 < <(run "$RESIL_PORT"); R+=("$rrps")
  printf '%-6s %-6s %12s %10s\n' "$i" resil "$rrps" "$rp99"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
pm=$(median "${P[@]}"); rm_=$(median "${R[@]}")
awk -v p="$pm" -v r="$rm_" 'BEGIN {printf "median req/s: plain %d, resil %d, resil/plain = %.3f\n", p, r, r/p}'
retries=$(curl -s "http://127.0.0.1:$RESIL_ADMIN/stats" | awk -F': ' '$1=="cluster.up.upstream_rq_retry" {print $2}')
echo "resil retries during the run: ${retries:-?} (must be 0: nothing was triggered)"
