#!/usr/bin/env bash
# Runtime API load benchmark (wrk): state get over HTTP for state.in-memory, state.sqlite and
# state.redis, against a plain proxied GET through the same mecha (ratio in the same run), and
# redis-benchmark -t get at the same concurrency. Needs: a release build, wrk, redis-server,
# redis-benchmark. Usage: benches/runtime-load.sh [duration_s] [connections]
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-10}; C=${2:-32}
BIN=target/release/mecha
[ -x "$BIN" ] || cargo build --release --bin mecha
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$W"' EXIT
RP=$((20000 + RANDOM % 10000)); HP=$((RP + 1)); GP=$((RP + 2)); PP=$((RP + 3))
mkdir -p "$W/res"
redis-server --port "$RP" --save "" --appendonly no --dir "$W" >/dev/null &
for s in mem:state.in-memory sql:state.sqlite red:state.redis; do
  n=${s%%:*}; t=${s#*:}
  { echo "apiVersion: dapr.io/v1alpha1"; echo "kind: Component"; echo "metadata: {name: $n}";
    echo "spec:"; echo "  type: $t"; echo "  metadata:";
    echo "  - {name: connectionString, value: $W/s.db}"; echo "  - {name: redisHost, value: 127.0.0.1:$RP}"; } > "$W/res/$n.yaml"
done
# One bootstrap: the runtime API listener (HP) and a plain proxy listener (PP) routing to HP's
# healthz, so "plain proxy" = one mecha hop to a trivial local answer.
cat > "$W/b.yaml" <<YAML
static_resources:
  listeners:
  - name: api
    address: { socket_address: { address: 127.0.0.1, port_value: $HP } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: api
          route_config: { virtual_hosts: [ { name: a, domains: ["*"], routes: [] } ] }
          http_filters:
          - { name: mecha.filters.http.runtime_api, typed_config: { "@type": type.googleapis.com/mecha.filters.http.runtime_api } }
          - { name: envoy.filters.http.router, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router } }
  - name: plain
    address: { socket_address: { address: 127.0.0.1, port_value: $PP } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          route_config: { virtual_hosts: [ { name: p, domains: ["*"], routes: [ { match: { prefix: "/" }, route: { cluster: api } } ] } ] }
          http_filters:
          - { name: envoy.filters.http.router, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router } }
  clusters:
  - name: api
    type: STATIC
    load_assignment: { cluster_name: api, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $HP } } } } ] } ] }
YAML
sleep 0.3
"$BIN" run -c "$W/b.yaml" --app-id bench --dapr-grpc-port "$GP" --resources-path "$W/res" --concurrency 1 -l warn &
sleep 1
for n in mem sql red; do
  curl -s -XPOST -H 'content-type: application/json' -d '[{"key":"k","value":"some value of moderate size"}]' "http://127.0.0.1:$HP/v1.0/state/$n" >/dev/null
done
run() { echo "== $1"; wrk -t1 -c"$C" -d"${D}s" --latency "$2" | grep -E "Requests/sec|50%|99%"; }
run "plain proxy (GET /v1.0/healthz through one mecha hop)" "http://127.0.0.1:$PP/v1.0/healthz"
run "runtime healthz (filter answers)" "http://127.0.0.1:$HP/v1.0/healthz"
for n in mem sql red; do run "state get $n" "http://127.0.0.1:$HP/v1.0/state/$n/k"; done
echo "== redis-benchmark -t get -c $C"
redis-benchmark -p "$RP" -t get -c "$C" -n 200000 -q | tr "\r" "\n" | grep -a "requests per second" | tail -1
