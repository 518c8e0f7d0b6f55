#!/usr/bin/env bash
# Load benchmark: one upstream, four paths to it, measured in the same run.
#
#   direct   load generator -> upstream
#   mecha    load generator -> mecha   (--concurrency 1)      -> upstream
#   nginx    load generator -> nginx   (worker_processes 1)   -> upstream (keepalive pool)
#   haproxy  load generator -> haproxy (nbthread 1)           -> upstream (http-reuse always)
#
# Each proxy runs on CPU $PROXY_CPU; the upstream (nginx, 1 worker, `return 200`) and the load
# generator share CPU $LOAD_CPU. Measured per path:
#   h1-sat   HTTP/1.1 keep-alive at saturation: wrk -t1 -c$CONNS           (req/s, p50, p99)
#   h1-rate  HTTP/1.1 at a fixed rate below the knee (half the slowest proxy's saturation
#            throughput, the same rate for every path): h2load --h1 --rps   (p50, p99)
#   h2-sat   HTTP/2 cleartext (prior knowledge) at saturation: h2load -c$H2_CONNS -m$H2_STREAMS
#   cpu      the proxy's CPU use during h1-sat (1.00 = one core busy), req/s per core-second, and
#            the user and kernel CPU time per request (from /proc/PID/stat)
# plus mecha's RSS idle and with 1,000 open, busy connections. Each measurement is repeated in
# ROUNDS rounds that alternate the paths (rotating their order), and the report gives medians: one
# sample per path let this VM's drift decide the ratios (single runs gave mecha/nginx 0.98-1.37x).
#
# Usage: scripts/load-bench.sh            (env: DURATION=5 ROUNDS=5 CONNS=64 H2_CONNS=16 H2_STREAMS=10
#                                          PROXY_CPU=0 LOAD_CPU=1 SKIP_BUILD=1 KEEP=1 MECHA_BIN=…
#                                          PGO=1: build and measure the profile-guided build,
#                                          scripts/pgo-build.sh -> target/pgo/release/mecha)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-5}"
CONNS="${CONNS:-64}"
H2_CONNS="${H2_CONNS:-16}"
H2_STREAMS="${H2_STREAMS:-10}"
PROXY_CPU="${PROXY_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"
RSS_CONNS="${RSS_CONNS:-1000}"
BASE_PORT="${BASE_PORT:-18080}"

UP_PORT=$BASE_PORT
MECHA_PORT=$((BASE_PORT + 1))
MECHA_ADMIN=$((BASE_PORT + 2))
NGINX_PORT=$((BASE_PORT + 3))
NGINX_H2_PORT=$((BASE_PORT + 4))
HAPROXY_PORT=$((BASE_PORT + 5))
HAPROXY_H2_PORT=$((BASE_PORT + 6))

log() { printf '== %s\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------------------------
source "$ROOT/scripts/bench-lib.sh"
install_missing wrk:wrk h2load:nghttp2-client nginx:nginx haproxy:haproxy taskset:util-linux
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [ -n "${PGO:-}" ]; then
  [ -n "${SKIP_BUILD:-}" ] || "$ROOT/scripts/pgo-build.sh" >&2
  MECHA_BIN="${MECHA_BIN:-$ROOT/target/pgo/release/mecha}"
elif [ -z "${SKIP_BUILD:-}" ]; then
  log "cargo build --release"
  (cd "$ROOT" && cargo build --release --bin mecha >&2)
fi
MECHA_BIN="${MECHA_BIN:-$ROOT/target/release/mecha}"

WORK="$(mktemp -d /tmp/mecha-load.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# --- configs -----------------------------------------------------------------------------------
mkdir -p "$WORK/up" "$WORK/nginx"
cat >"$WORK/up/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/up/nginx.pid;
error_log $WORK/up/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$UP_PORT backlog=4096;
    location / { return 200 "ok\n"; }
  }
}
EOF

cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  upstream up {
    server 127.0.0.1:$UP_PORT;
    keepalive 1024;
    keepalive_requests 100000000;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT backlog=4096;
    listen 127.0.0.1:$NGINX_H2_PORT http2 backlog=4096;
    http2_max_concurrent_streams 256;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF

cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:$HAPROXY_PORT
  bind 127.0.0.1:$HAPROXY_H2_PORT proto h2
  default_backend be
backend be
  server up 127.0.0.1:$UP_PORT
EOF

cat >"$WORK/mecha.yaml" <<EOF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $MECHA_ADMIN } }
static_resources:
  listeners:
  - name: bench
    address: { socket_address: { address: 127.0.0.1, port_value: $MECHA_PORT } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: up }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $UP_PORT } } }
EOF

# --- processes ---------------------------------------------------------------------------------
taskset -c "$LOAD_CPU" nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" -e "$WORK/up/error.log" &
PIDS+=($!)
taskset -c "$PROXY_CPU" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" &
NGINX_PID=$!
PIDS+=($NGINX_PID)
taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=($HAPROXY_PID)
taskset -c "$PROXY_CPU" "$MECHA_BIN" run -c "$WORK/mecha.yaml" --concurrency 1 --log-level warn \
  >"$WORK/mecha.log" 2>&1 &
MECHA_PID=$!
PIDS+=($MECHA_PID)
for p in $UP_PORT $MECHA_PORT $NGINX_PORT $NGINX_H2_PORT $HAPROXY_PORT $HAPROXY_H2_PORT; do
  wait_port "$p"
done
sleep 0.5
curl -fsS "http://127.0.0.1:$MECHA_PORT/" >/dev/null
curl -fsS "http://127.0.0.1:$NGINX_PORT/" >/dev/null
curl -fsS "http://127.0.0.1:$HAPROXY_PORT/" >/dev/null

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
MECHA_RSS_IDLE=$(rss_kb "$MECHA_PID")

# All processes of a proxy (nginx: master + worker).
proc_tree() { echo "$1"; pgrep -P "$1" || true; }
cpu_ticks() { # -> "user system" clock ticks
  local u=0 s=0 p pu ps
  for p in $(proc_tree "$1"); do
    [ -r "/proc/$p/stat" ] || continue
    read -r pu ps < <(awk '{print $14, $15}' "/proc/$p/stat")
    u=$((u + pu)) s=$((s + ps))
  done
  echo "$u $s"
}
HZ=$(getconf CLK_TCK)

# wrk latency text (e.g. 812.00us, 1.20ms, 2.00s) -> milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000;
    printf "%.3f", n }'
}
# p50 and p99 (ms) from an h2load --log-file (3rd column: microseconds).
log_pcts() {
  cat "$@" | awk '$2 >= 200 && $2 < 300 {print $3}' | sort -n | awk '
    { a[NR] = $1 } END {
      if (NR == 0) { print "nan nan"; exit }
      i50 = int(NR * 0.50); if (i50 < 1) i50 = 1;
      i99 = int(NR * 0.99); if (i99 < 1) i99 = 1;
      printf "%.3f %.3f\n", a[i50] / 1000, a[i99] / 1000 }'
}

declare -A PORT=([direct]=$UP_PORT [mecha]=$MECHA_PORT [nginx]=$NGINX_PORT [haproxy]=$HAPROXY_PORT)
declare -A H2PORT=([direct]="" [mecha]=$MECHA_PORT [nginx]=$NGINX_H2_PORT [haproxy]=$HAPROXY_H2_PORT)
declare -A PID=([direct]="" [mecha]=$MECHA_PID [nginx]=$NGINX_PID [haproxy]=$HAPROXY_PID)
TARGETS=(direct mecha nginx haproxy)
# Per-round values, keyed "target.round"; the report takes medians over the rounds.
declare -A RPS P50 P99 CPU USR_US SYS_US RATE_P50 RATE_P99 RATE_RPS H2_RPS H2_P50 H2_P99 ERRS

# Round r measures the paths in an order rotated by r, so no path always runs first or last
# while the VM's speed drifts (nginx alone has ranged 41k-55k req/s between runs).
rotated() { # r path...
  local r=$1; shift
  local a=("$@") n=$# i
  for ((i = 0; i < n; i++)); do echo "${a[(i + r) % n]}"; done
}

# --- HTTP/1.1 saturation (wrk) -----------------------------------------------------------------
h1_sat() { # target round
  local t=$1 r=$2 k="$1.$2" url="http://127.0.0.1:${PORT[$1]}/" c0="0 0" c1 s0 s1 out n
  # Warm-up (pools, caches): 2 s in the first round, 1 s after.
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$((r == 1 ? 2 : 1))s" "$url" >/dev/null
  [ -n "${PID[$t]}" ] && c0=$(cpu_ticks "${PID[$t]}")
  s0=$(date +%s.%N)
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$url")
  s1=$(date +%s.%N)
  echo "$out" >"$WORK/wrk-$k.txt"
  RPS[$k]=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
  P50[$k]=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
  P99[$k]=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
  ERRS[$t]+=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  CPU[$k]="-"
  if [ -n "${PID[$t]}" ]; then
    c1=$(cpu_ticks "${PID[$t]}")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    read -r CPU[$k] USR_US[$k] SYS_US[$k] < <(awk -v a="$c0" -v b="$c1" -v s0="$s0" -v s1="$s1" \
      -v hz="$HZ" -v n="${n:-0}" 'BEGIN {
        split(a, x, " "); split(b, y, " "); u = (y[1] - x[1]) / hz; s = (y[2] - x[2]) / hz
        if (n > 0) printf "%.2f %.2f %.2f\n", (u + s) / (s1 - s0), u / n * 1e6, s / n * 1e6
        else printf "%.2f - -\n", (u + s) / (s1 - s0) }')
  fi
  log "round $r h1-sat $t: ${RPS[$k]} req/s p50 ${P50[$k]} ms p99 ${P99[$k]} ms cpu ${CPU[$k]}"
}
for ((r = 1; r <= ROUNDS; r++)); do
  for t in $(rotated "$r" "${TARGETS[@]}"); do h1_sat "$t" "$r"; done
done

# Median of a field over the rounds: med ARRAY target.
med() {
  local -n arr=$1
  local r
  for ((r = 1; r <= ROUNDS; r++)); do echo "${arr[$2.$r]:-nan}"; done | sort -g | awk '
    { a[NR] = $1 } END {
      m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
      s = sprintf("%.3f", m); sub(/\.?0+$/, "", s); print s }'
}
# Per-round ratios of a field, mecha over B: "median (min-max)". ratios ARRAY B.
ratios() {
  local -n arr=$1
  local r
  for ((r = 1; r <= ROUNDS; r++)); do
    awk -v a="${arr[mecha.$r]:-0}" -v b="${arr[$2.$r]:-0}" 'BEGIN { if (a > 0 && b > 0) printf "%.3f\n", a / b }'
  done | sort -g | awk '
    { a[NR] = $1 } END {
      if (NR == 0) { print "-"; exit }
      m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
      if (NR == 1) printf "%.2fx", m; else printf "%.2fx (%.2f-%.2f)", m, a[1], a[NR] }'
}
declare -A PER_CPU
for t in "${TARGETS[@]}"; do
  for ((r = 1; r <= ROUNDS; r++)); do
    PER_CPU[$t.$r]=$(awk -v r="${RPS[$t.$r]}" -v c="${CPU[$t.$r]/-/0}" 'BEGIN { if (c > 0) printf "%.0f", r / c }')
  done
done

# --- HTTP/1.1 at a fixed rate below the knee (h2load --h1 --rps) -------------------------------
min_rps=$(med RPS mecha)
for t in nginx haproxy; do
  m=$(med RPS "$t")
  awk -v a="$m" -v b="$min_rps" 'BEGIN { exit !(a < b) }' && min_rps=$m
done
RATE_CLIENTS=16
RATE=$(awk -v m="$min_rps" -v c="$RATE_CLIENTS" 'BEGIN { printf "%d", int(m / 2 / c) * c }')
h1_rate() {
  local t=$1 r=$2 k="$1.$2" url="http://127.0.0.1:${PORT[$1]}/" out
  rm -f "$WORK/rate-$k.log"
  out=$(taskset -c "$LOAD_CPU" h2load --h1 -t1 -c"$RATE_CLIENTS" --rps=$((RATE / RATE_CLIENTS)) \
    -D "$DURATION" --warm-up-time=1 --log-file="$WORK/rate-$k.log" "$url")
  RATE_RPS[$k]=$(awk '/^finished in/ {gsub(",", "", $4); printf "%.0f", $4}' <<<"$out")
  read -r RATE_P50[$k] RATE_P99[$k] < <(log_pcts "$WORK/rate-$k.log")
  log "round $r h1-rate $t @ $RATE/s: ${RATE_RPS[$k]} req/s p50 ${RATE_P50[$k]} ms p99 ${RATE_P99[$k]} ms"
}
for ((r = 1; r <= ROUNDS; r++)); do
  for t in $(rotated "$r" "${TARGETS[@]}"); do h1_rate "$t" "$r"; done
done

# --- HTTP/2 cleartext saturation (h2load) ------------------------------------------------------
h2_sat() {
  local t=$1 r=$2 k="$1.$2" url="http://127.0.0.1:${H2PORT[$1]}/" out
  taskset -c "$LOAD_CPU" h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D "$((r == 1 ? 2 : 1))" "$url" >/dev/null
  rm -f "$WORK/h2-$k.log"
  out=$(taskset -c "$LOAD_CPU" h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D "$DURATION" \
    --warm-up-time=1 --log-file="$WORK/h2-$k.log" "$url")
  echo "$out" >"$WORK/h2-$k.txt"
  H2_RPS[$k]=$(awk '/^finished in/ {gsub(",", "", $4); printf "%.0f", $4}' <<<"$out")
  read -r H2_P50[$k] H2_P99[$k] < <(log_pcts "$WORK/h2-$k.log")
  grep -q "succeeded" <<<"$out" && log "round $r h2-sat $t: ${H2_RPS[$k]} req/s p50 ${H2_P50[$k]} ms p99 ${H2_P99[$k]} ms ($(grep '^requests:' <<<"$out"))"
}
for ((r = 1; r <= ROUNDS; r++)); do
  for t in $(rotated "$r" mecha nginx haproxy); do h2_sat "$t" "$r"; done
done

# --- mecha RSS with 1,000 open, busy connections -----------------------------------------------
taskset -c "$LOAD_CPU" wrk -t1 -c"$RSS_CONNS" -d8s "http://127.0.0.1:$MECHA_PORT/" >"$WORK/wrk-rss.txt" &
WRK_RSS=$!
sleep 5
MECHA_RSS_BUSY=$(rss_kb "$MECHA_PID")
OPEN=$(curl -fsS "http://127.0.0.1:$MECHA_ADMIN/stats" | awk -F': ' '$1 == "http.bench.downstream_cx_active" {print $2}')
wait $WRK_RSS
MECHA_HWM=$(awk '/^VmHWM/ {print $2}' "/proc/$MECHA_PID/status")
sleep 1
MECHA_RSS_AFTER=$(rss_kb "$MECHA_PID")

# --- report ------------------------------------------------------------------------------------
echo
echo "mecha load benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo))"
echo "proxies on CPU $PROXY_CPU (1 worker each), upstream nginx + load generator on CPU $LOAD_CPU, ${DURATION}s per point,"
echo "$ROUNDS alternating rounds: the table shows each path's median over the rounds, the ratios are medians of per-round ratios (min-max)"
echo "$("$MECHA_BIN" --version), $(nginx -v 2>&1 | sed 's/.*: //'), $(haproxy -v | head -1 | awk '{print "haproxy/" $3}'), $(wrk --version 2>&1 | head -1 | awk '{print "wrk/" $2}'), $(h2load --version | awk '{print $2}')"
echo "mecha binary: ${MECHA_BIN#"$ROOT"/}"
echo
printf '%-8s | %-34s | %-9s | %-30s | %s\n' "" "HTTP/1.1 saturation (wrk -c$CONNS)" "" "HTTP/1.1 at $RATE req/s" "HTTP/2 h2c (h2load -c$H2_CONNS -m$H2_STREAMS)"
printf '%-8s | %10s %10s %10s | %4s %7s | %10s %10s %7s | %10s %10s %10s\n' \
  path "req/s" "p50 ms" "p99 ms" cpu "rq/cpu-s" "req/s" "p50 ms" "p99 ms" "req/s" "p50 ms" "p99 ms"
for t in "${TARGETS[@]}"; do
  h2=(- - -)
  [ "$t" != direct ] && h2=("$(med H2_RPS "$t")" "$(med H2_P50 "$t")" "$(med H2_P99 "$t")")
  cpu=-
  [ "$t" != direct ] && cpu=$(med CPU "$t")
  printf '%-8s | %10s %10s %10s | %4s %7s | %10s %10s %7s | %10s %10s %10s\n' "$t" \
    "$(med RPS "$t")" "$(med P50 "$t")" "$(med P99 "$t")" "$cpu" "$( [ "$t" = direct ] && echo - || med PER_CPU "$t")" \
    "$(med RATE_RPS "$t")" "$(med RATE_P50 "$t")" "$(med RATE_P99 "$t")" "${h2[@]}"
done
echo
echo "ratios, mecha over each path (HTTP/1.1 saturation req/s; p99 at saturation; p99 at fixed rate; HTTP/2 req/s):"
for b in direct nginx haproxy; do
  h2r="-"
  [ "$b" != direct ] && h2r=$(ratios H2_RPS "$b")
  echo "  mecha/$b: throughput $(ratios RPS "$b"), p99 $(ratios P99 "$b"), fixed-rate p99 $(ratios RATE_P99 "$b"), h2 throughput $h2r"
done
echo "  req per cpu-second: mecha/nginx $(ratios PER_CPU nginx), mecha/haproxy $(ratios PER_CPU haproxy)"
echo "  CPU per request at saturation, user + kernel µs (medians):$(for t in mecha nginx haproxy; do
  printf ' %s %s + %s;' "$t" "$(med USR_US "$t")" "$(med SYS_US "$t")"; done)"
echo
echo "mecha RSS: idle $((MECHA_RSS_IDLE / 1024)) MB ($MECHA_RSS_IDLE kB); with ${OPEN:-?} open busy connections $((MECHA_RSS_BUSY / 1024)) MB ($MECHA_RSS_BUSY kB); peak $((MECHA_HWM / 1024)) MB; after they closed $((MECHA_RSS_AFTER / 1024)) MB"
for t in "${TARGETS[@]}"; do
  [ -n "${ERRS[$t]:-}" ] && [ -n "${ERRS[$t]// /}" ] && echo "note: $t: ${ERRS[$t]}"
done
[ -n "${KEEP:-}" ] && echo "raw output kept in $WORK"
exit 0
