#!/usr/bin/env bash
# Transparent capture load benchmark (issue 5), in real network namespaces. Each path has its
# own client namespace (wrk) and server namespace (nginx, one worker, `return 200`) joined by a
# veth pair; the client requests http://SERVER_IP/ with plain HTTP/1.1 keep-alive:
#   direct    no rules: client -> server
#   outbound  `mecha iptables install` in the client namespace, mecha on 15001 (use_original_dst,
#             http_inspector, HCM route to an ORIGINAL_DST cluster): client -> mecha -> server
#   two-hop   as outbound, plus `mecha iptables install` in the server namespace and mecha on
#             15006 (original_dst, HCM route to 127.0.0.1:80): client -> mecha -> mecha -> server,
#             as between two sidecars
# (One pair per path rather than toggling rules: rules installed under a live pooled connection
# redirect its next packet mid-stream.) Every mecha runs as uid 1337 (`setpriv`),
# `--concurrency 1`, pinned to PROXY_CPU; wrk and nginx share LOAD_CPU. Each path is checked
# first (mecha's response headers present or absent as expected); rounds cycle
# direct/outbound/two-hop to cancel drift. Reported: req/s, p50, p99 and the CPU its mechas used
# (from /proc/PID/stat, 1.00 = one core) per round; the median per path, ratios against direct,
# and req/s per mecha CPU-second (meaningful when the shared box, not mecha, is the bottleneck).
#
# Needs root, ip, iptables, setpriv, taskset, nginx, curl; installs wrk when missing.
# Usage: sudo benches/transparent-load.sh   (env: DURATION=10 CONNS=32 ROUNDS=3 PROXY_CPU=0
#                                           LOAD_CPU=1 SKIP_BUILD=1)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DURATION="${DURATION:-10}"
CONNS="${CONNS:-32}"
ROUNDS="${ROUNDS:-3}"
PROXY_CPU="${PROXY_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-1}"

log() { printf '== %s\n' "$*" >&2; }
die() { echo "transparent-load: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, iptables)"
if ! command -v wrk >/dev/null; then
  log "apt-get install -y wrk"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >&2 || die "cannot install wrk"
fi
for t in ip iptables setpriv taskset nginx curl wrk; do
  command -v "$t" >/dev/null || die "missing $t (apt-get install iproute2 iptables util-linux nginx curl wrk)"
done
if [ -z "${SKIP_BUILD:-}" ]; then
  log "cargo build --release --bin mecha"
  (cd "$ROOT" && cargo build --release --bin mecha >&2)
fi
MECHA="$ROOT/target/release/mecha"
[ -x "$MECHA" ] || die "no $MECHA (run without SKIP_BUILD)"

TAG="$(($$ % 100000))"
MODES=(direct outbound two-hop)
WORK="$(mktemp -d)"
chmod 755 "$WORK" # mecha runs as uid 1337 and reads its config from here
PIDS=()
NSS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  for f in "$WORK"/nginx-*/nginx.pid; do
    if [ -s "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; fi
  done
  # Deleting a namespace deletes its veth end and its iptables rules.
  for ns in "${NSS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
cns() { echo "mtlc$1$TAG"; } # client namespace of path $1 (0..2)
sns() { echo "mtls$1$TAG"; } # server namespace of path $1
server_ip() { echo "10.251.$1.2"; }

pair() { # path index: client/server namespaces over a veth pair, nginx in the server namespace
  local c s d vc="mtlvc$1$TAG" vs="mtlvs$1$TAG"
  c="$(cns "$1")"; s="$(sns "$1")"; d="$WORK/nginx-$1"
  ip netns add "$c"; NSS+=("$c")
  ip netns add "$s"; NSS+=("$s")
  ip link add "$vc" netns "$c" type veth peer name "$vs" netns "$s"
  ip -n "$c" addr add "10.251.$1.1/30" dev "$vc"
  ip -n "$s" addr add "10.251.$1.2/30" dev "$vs"
  for ns in "$c" "$s"; do ip -n "$ns" link set lo up; done
  ip -n "$c" link set "$vc" up
  ip -n "$s" link set "$vs" up
  # The app: nginx on all addresses (mecha inbound reaches it on 127.0.0.1).
  mkdir -p "$d"
  cat >"$d/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $d;
  proxy_temp_path $d;
  fastcgi_temp_path $d;
  uwsgi_temp_path $d;
  scgi_temp_path $d;
  keepalive_requests 1000000;
  server { listen 0.0.0.0:80; location / { return 200 "ok\n"; } }
}
EOF
  ip netns exec "$s" taskset -c "$LOAD_CPU" nginx -c "$d/nginx.conf" -p "$d" &
  PIDS+=($!)
}

cat >"$WORK/outbound.yaml" <<'EOF'
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 15000}}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {socket_address: {address: 0.0.0.0, port_value: 15001}}
    use_original_dst: true
    listener_filters:
    - name: envoy.filters.listener.http_inspector
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector}
    filter_chains:
    - name: http-80
      filter_chain_match: {destination_port: 80, application_protocols: [http/1.1, h2c]}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_80
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: outbound_80}
              response_headers_to_add:
              - header: {key: x-mecha-outbound, value: "80"}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
    default_filter_chain:
      name: passthrough
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: passthrough
          cluster: PassthroughCluster
  clusters:
  - {name: outbound_80, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, connect_timeout: 2s}
  - {name: PassthroughCluster, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, connect_timeout: 2s}
EOF
cat >"$WORK/inbound.yaml" <<'EOF'
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 15000}}
static_resources:
  listeners:
  - name: virtualInbound
    address: {socket_address: {address: 0.0.0.0, port_value: 15006}}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}
    filter_chains:
    - name: inbound-80
      filter_chain_match: {destination_port: 80}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound_80
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: "inbound|80||"}
              response_headers_to_add:
              - header: {key: x-mecha-inbound, value: "80"}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: "inbound|80||"
    connect_timeout: 2s
    load_assignment:
      cluster_name: "inbound|80||"
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 80}}}
EOF


declare -A MPIDS
start_mecha() { # namespace config-name path-index
  ip netns exec "$1" taskset -c "$PROXY_CPU" setpriv --reuid 1337 --regid 1337 --clear-groups \
    "$MECHA" run -c "$WORK/$2.yaml" --concurrency 1 --log-level warn >"$WORK/$1.log" 2>&1 &
  PIDS+=($!)
  MPIDS[$3]+="$! " # `ip netns exec`, taskset and setpriv exec: $! is mecha itself
  for _ in $(seq 100); do
    ip netns exec "$1" curl -sf http://127.0.0.1:15000/ready >/dev/null && return 0
    sleep 0.1
  done
  cat "$WORK/$1.log" >&2
  die "mecha in $1 did not become ready"
}

for i in 0 1 2; do
  m="${MODES[$i]}"
  log "path $m: $(cns "$i") -> $(sns "$i") ($(server_ip "$i"))"
  pair "$i"
  if [ "$m" != direct ]; then
    ip netns exec "$(cns "$i")" "$MECHA" iptables install >/dev/null
    start_mecha "$(cns "$i")" outbound "$i"
  fi
  if [ "$m" = two-hop ]; then
    ip netns exec "$(sns "$i")" "$MECHA" iptables install >/dev/null
    start_mecha "$(sns "$i")" inbound "$i"
  fi
  # The path is what it should be: mecha's response headers present or absent.
  h="$(ip netns exec "$(cns "$i")" curl -sS -i "http://$(server_ip "$i")/")" || die "$m: request failed"
  out=0; in=0
  grep -qi '^x-mecha-outbound: 80' <<<"$h" && out=1
  grep -qi '^x-mecha-inbound: 80' <<<"$h" && in=1
  case "$m:$out$in" in
    direct:00 | outbound:10 | two-hop:11) ;;
    *) die "$m: unexpected path (outbound header $out, inbound header $in): $h" ;;
  esac
done

to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; printf "%.3f", v}' <<<"$1"; }
ticks() { # CPU ticks (user + system) used so far by the mechas of path $1
  local t=0 p
  for p in ${MPIDS[$1]:-}; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}
HZ="$(getconf CLK_TCK)"
run() { # path index -> "rps p50_ms p99_ms proxy_cpu" (proxy_cpu: cores used by its mechas)
  local out rps p50 p99 t0 t1
  t0="$(ticks "$1")"
  out="$(ip netns exec "$(cns "$1")" taskset -c "$LOAD_CPU" \
    wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://$(server_ip "$1")/")"
  if grep -q 'Non-2xx\|Socket errors' <<<"$out"; then echo "$out" >&2; die "errors during the run"; fi
  rps="$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out")"
  p50="$(to_ms "$(awk '$1=="50%" {print $2}' <<<"$out")")"
  p99="$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")")"
  t1="$(ticks "$1")"
  echo "$rps $p50 $p99 $(awk -v t=$((t1 - t0)) -v hz="$HZ" -v d="$DURATION" 'BEGIN {printf "%.2f", t / hz / d}')"
}

declare -A RPS P50 P99 CPU
log "warm-up"
for i in 0 1 2; do DURATION=2 run "$i" >/dev/null; done
printf '%-6s %-9s %10s %9s %9s %9s\n' round path req/s p50_ms p99_ms proxy_cpu
for r in $(seq "$ROUNDS"); do
  for i in 0 1 2; do
    m="${MODES[$i]}"
    read -r rps p50 p99 cpu < <(run "$i")
    RPS[$m]+="$rps "; P50[$m]+="$p50 "; P99[$m]+="$p99 "; CPU[$m]+="$cpu "
    printf '%-6s %-9s %10s %9s %9s %9s\n' "$r" "$m" "$rps" "$p50" "$p99" "$cpu"
  done
done
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
printf 'median of %s rounds (%ss each, %s connections)\n' "$ROUNDS" "$DURATION" "$CONNS"
printf '%-9s %10s %9s %9s %11s %10s %10s %9s %14s\n' path req/s p50_ms p99_ms rps/direct p50/direct \
  p99/direct proxy_cpu req/s/cpu-s
dr="$(median "${RPS[direct]}")"; d50="$(median "${P50[direct]}")"; d99="$(median "${P99[direct]}")"
for m in "${MODES[@]}"; do
  r="$(median "${RPS[$m]}")"; a="$(median "${P50[$m]}")"; b="$(median "${P99[$m]}")"
  c="$(median "${CPU[$m]}")"
  awk -v m="$m" -v r="$r" -v a="$a" -v b="$b" -v c="$c" -v dr="$dr" -v d50="$d50" -v d99="$d99" \
    'BEGIN {printf "%-9s %10d %9.3f %9.3f %11.3f %10.2f %10.2f %9.2f %14s\n", m, r, a, b, r/dr, a/d50,
      b/d99, c, (c > 0 ? sprintf("%d", r / c) : "-")}'
done
st() { ip netns exec "$1" curl -s http://127.0.0.1:15000/stats | awk -F': ' -v k="$2" '$1==k {print $2}'; }
echo "requests through mecha: outbound path $(st "$(cns 1)" http.outbound_80.downstream_rq_total)," \
  "two-hop path $(st "$(cns 2)" http.outbound_80.downstream_rq_total) outbound +" \
  "$(st "$(sns 2)" http.inbound_80.downstream_rq_total) inbound"
