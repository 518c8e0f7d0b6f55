# Helpers shared by the benchmark and build scripts (sourced, not run).

# install_missing CMD:PACKAGE...: apt-get installs the packages whose command is missing.
install_missing() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
  done
  ((${#need[@]})) || return 0
  printf '== installing %s\n' "${need[*]}" >&2
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
}

# wait_port PORT: waits up to 10 s for a loopback TCP port to accept connections.
wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "port $1 did not open" >&2
  return 1
}

# ep NAME PORT: a STATIC cluster's load_assignment with one loopback endpoint.
ep() { echo "load_assignment: { cluster_name: $1, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $2 } } } } ] } ] }"; }

# hcm STAT_PREFIX ROUTES FILTERS: a listener's filter chain with an HTTP connection manager whose
# one virtual host (`*`) has ROUTES; FILTERS (indented YAML lines) go before the router.
hcm() {
  cat <<YAML
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          route_config: { virtual_hosts: [ { name: $1, domains: ["*"], routes: [ $2 ] } ] }
          http_filters:
$3          - { name: envoy.filters.http.router, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router } }
YAML
}

# The runtime API filter, as a FILTERS argument of hcm.
RTF='          - { name: mecha.filters.http.runtime_api, typed_config: { "@type": type.googleapis.com/mecha.filters.http.runtime_api } }
'
