#!/usr/bin/env bash
# Makes the servers the test suite talks to available on 127.0.0.1, the way a fresh Debian machine needs:
# check each one, start it if it is installed but stopped, install it with apt-get if it is missing.
#
#   scripts/services.sh up     # Redis :6379, RabbitMQ :5672, memcached :11211 and :11212; TLS
#                              # listeners requiring client certificates: Redis :6390, and RabbitMQ
#                              # :5676 (a node of its own, machinery-tls@localhost), a Redis Cluster
#                              # over TLS only (3 masters on :7100-7102), a Redis Sentinel over
#                              # TLS only (master :6391, sentinel :26390, `tlsmaster`); a Redis Cluster of
#                              # 3 masters + 3 replicas on :7000-7005; a Redis Sentinel set (master
#                              # :6380, replica :6381, sentinels :26379-26381, master name `mymaster`);
#                              # a 3-node RabbitMQ cluster (:5673-:5675, nodes machinery-c1..c3@localhost);
#                              # Chromium with chromedriver for the dashboard's browser test (installed
#                              # only: the test starts chromedriver on a free port and stops it)
#   scripts/services.sh down   # stops what `up` started (and only that)
#
# State (what we started) is kept in target/services/. The TLS listeners use a private CA and a server
# certificate made here with openssl, in target/services/tls/ (ca.pem, ca.key, server.pem, server.key;
# node.pem, node.key: the TLS cluster nodes' client certificate);
# the server certificate names machinery-tls.test and 127.0.0.1, not localhost. The tests make their
# client certificates with that CA (tests/src/tls.rs).
set -euo pipefail

cd "$(dirname "$0")/.."
state_dir="target/services"
mkdir -p "$state_dir"

log() { printf '[services] %s\n' "$*" >&2; }

reachable() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_for() { # name port seconds
  local name=$1 port=$2 seconds=$3 i
  for ((i = 0; i < seconds * 10; i++)); do
    if reachable 127.0.0.1 "$port"; then return 0; fi
    sleep 0.1
  done
  log "$name did not come up on 127.0.0.1:$port within ${seconds}s"
  return 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1
  fi
}

apt_updated=""
apt_install() { # package...
  log "installing $* with apt-get"
  if [ -z "$apt_updated" ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  # policy-rc.d keeps the package scripts from starting services (no systemd here); we start them ourselves.
  as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

redis_up() {
  if reachable 127.0.0.1 6379; then log "redis: running"; return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  log "redis: starting"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no \
    --logfile "$PWD/$state_dir/redis.log" --pidfile "$PWD/$state_dir/redis.pid"
  touch "$state_dir/started-redis"
  wait_for redis 6379 20
}

rabbitmq_up() {
  if reachable 127.0.0.1 5672; then log "rabbitmq: running"; return; fi
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  log "rabbitmq: starting"
  as_root rabbitmq-server -detached
  touch "$state_dir/started-rabbitmq"
  as_root timeout 120 rabbitmqctl await_startup >/dev/null
  wait_for rabbitmq 5672 60
}

# --- Redis Sentinel: master :6380, replica :6381, sentinels :26379-26381 watching `mymaster` ---------

sentinel_dir="$state_dir/sentinel"

# Starts one redis-server of the Sentinel set ($1: port, then extra arguments) unless its port answers;
# records its port so that `down` stops it.
sentinel_redis() {
  local port=$1; shift
  if reachable 127.0.0.1 "$port"; then log "redis :$port: running"; return; fi
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
    --dir "$PWD/$sentinel_dir" --logfile "$PWD/$sentinel_dir/redis-$port.log" \
    --pidfile "$PWD/$sentinel_dir/redis-$port.pid" "$@"
  echo "$port" >>"$state_dir/started-sentinel"
}

sentinel_up() {
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p "$sentinel_dir"
  if reachable 127.0.0.1 26379 && reachable 127.0.0.1 6380 && reachable 127.0.0.1 6381; then
    log "redis sentinel set: running"; return
  fi
  log "redis sentinel set: starting (master :6380, replica :6381, sentinels :26379-26381)"
  sentinel_redis 6380
  sentinel_redis 6381 --replicaof 127.0.0.1 6380
  local port
  for port in 26379 26380 26381; do
    if reachable 127.0.0.1 "$port"; then continue; fi
    # A sentinel rewrites its configuration file as it learns the topology: a fresh one each start.
    {
      echo "port $port"
      echo "bind 127.0.0.1"
      echo "sentinel monitor mymaster 127.0.0.1 6380 2"
      echo "sentinel down-after-milliseconds mymaster 2000"
      echo "sentinel failover-timeout mymaster 10000"
      echo "sentinel parallel-syncs mymaster 1"
    } >"$sentinel_dir/sentinel-$port.conf"
    redis-server "$PWD/$sentinel_dir/sentinel-$port.conf" --sentinel --daemonize yes \
      --dir "$PWD/$sentinel_dir" --logfile "$PWD/$sentinel_dir/sentinel-$port.log" \
      --pidfile "$PWD/$sentinel_dir/redis-$port.pid"
    echo "$port" >>"$state_dir/started-sentinel"
  done
  for port in 6380 6381 26379 26380 26381; do wait_for "redis :$port" "$port" 20; done
}

# --- RabbitMQ cluster: nodes machinery-c1..c3@localhost on :5673-:5675 ------------------------------

rabbitmq_cluster_dir="$state_dir/rabbitmq-cluster"

# Runs a RabbitMQ command ($2: rabbitmq-server, rabbitmqctl, ...) for cluster node $1 (1..3), with its own
# node name, ports, data, logs and configuration, and the cluster's shared Erlang cookie (in its HOME).
rabbitmq_node() {
  local n=$1 command=$2 dir="$PWD/$rabbitmq_cluster_dir" bin; shift 2
  # Debian's rabbitmq-server is a wrapper that switches to the rabbitmq user and drops our variables:
  # run the real scripts.
  bin=$(dirname "$(readlink -f "$(command -v rabbitmq-server)")")
  [ -x "$bin/$command" ] || bin=$(dirname "$(command -v rabbitmq-server)")
  env HOME="$dir/home" RABBITMQ_NODENAME="machinery-c$n@localhost" RABBITMQ_NODE_PORT=$((5672 + n)) \
    RABBITMQ_DIST_PORT=$((25672 + n)) RABBITMQ_MNESIA_BASE="$dir/c$n/mnesia" \
    RABBITMQ_LOG_BASE="$dir/c$n/log" RABBITMQ_PID_FILE="$dir/c$n/pid" \
    RABBITMQ_CONFIG_FILE="$dir/c$n/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$dir/c$n/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" "$bin/$command" "$@"
}

# Starts the three nodes in the background (they boot in parallel with the rest of `up`); the forming
# of the cluster is finished by rabbitmq_cluster_wait.
rabbitmq_cluster_start() {
  rabbitmq_cluster_started=""
  if reachable 127.0.0.1 5673 && reachable 127.0.0.1 5674 && reachable 127.0.0.1 5675; then
    log "rabbitmq cluster :5673-:5675: running"; return
  fi
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  local dir="$PWD/$rabbitmq_cluster_dir" n
  # Fresh data every time: a cluster whose nodes were stopped one by one would wait at boot for the
  # node that stopped last.
  rm -rf "$dir"
  mkdir -p "$dir/home"
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/home/.erlang.cookie"
  chmod 400 "$dir/home/.erlang.cookie"
  echo "[]." >"$dir/enabled_plugins"
  log "rabbitmq cluster :5673-:5675: starting nodes machinery-c1..c3@localhost"
  for n in 1 2 3; do
    mkdir -p "$dir/c$n/mnesia" "$dir/c$n/log"
    {
      echo "listeners.tcp.default = 127.0.0.1:$((5672 + n))"
      echo "loopback_users = none"
    } >"$dir/c$n/rabbitmq.conf"
    echo "[]." >"$dir/c$n/advanced.config"
    rabbitmq_node "$n" rabbitmq-server -detached
  done
  touch "$state_dir/started-rabbitmq-cluster"
  rabbitmq_cluster_started=1
}

rabbitmq_cluster_wait() {
  [ -n "$rabbitmq_cluster_started" ] || return 0
  local n i
  for n in 1 2 3; do
    # await_startup gives up at once while the node is not yet registered with epmd: ask again.
    for ((i = 0; i < 24; i++)); do
      if rabbitmq_node "$n" rabbitmqctl await_startup --timeout 5 >/dev/null 2>&1; then break; fi
      sleep 1
    done
  done
  for n in 2 3; do
    # (start_app logs harmless errors about the tables of nodes not yet started.)
    rabbitmq_node "$n" rabbitmqctl stop_app >/dev/null
    rabbitmq_node "$n" rabbitmqctl join_cluster machinery-c1@localhost >/dev/null
    rabbitmq_node "$n" rabbitmqctl start_app >/dev/null 2>&1
  done
  for n in 1 2 3; do wait_for "rabbitmq cluster node c$n" $((5672 + n)) 60; done
  log "rabbitmq cluster :5673-:5675: ready"
}

stop_pid() { # name pidfile
  local pid i
  [ -f "$2" ] || return 0
  pid=$(cat "$2")
  kill "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$2"
  log "$1: stopped"
}

memcached_up() { # port
  local port=$1
  if reachable 127.0.0.1 "$port"; then log "memcached :$port: running"; return; fi
  command -v memcached >/dev/null || apt_install memcached
  log "memcached :$port: starting"
  memcached -d -u "$(id -un)" -l 127.0.0.1 -p "$port" -U 0 -m 64 -P "$PWD/$state_dir/memcached-$port.pid"
  echo "$port" >>"$state_dir/started-memcached"
  wait_for "memcached :$port" "$port" 20
}

browser_up() {
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    log "chromium and chromedriver: installed"; return
  fi
  apt_install chromium chromium-driver
  command -v chromedriver >/dev/null || { log "chromedriver is still missing after apt-get"; return 1; }
}

tls_dir="$state_dir/tls"

# A private CA and the TLS servers' certificate, made once (again when missing or about to expire; the
# TLS servers started earlier are stopped first, so that they come back with the new one).
tls_certs() {
  if [ -f "$tls_dir/ca.pem" ] && [ -f "$tls_dir/server.pem" ] && [ -f "$tls_dir/server.key" ] \
    && openssl x509 -checkend 604800 -noout -in "$tls_dir/server.pem" >/dev/null 2>&1; then
    return
  fi
  command -v openssl >/dev/null || apt_install openssl
  log "tls: making a private CA and the servers' certificate in $tls_dir"
  tls_down
  mkdir -p "$tls_dir"
  (
    cd "$tls_dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
      -subj "/CN=machinery test CA" -keyout ca.key -out ca.pem \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -subj "/CN=machinery-tls.test" -keyout server.key -out server.csr 2>/dev/null
    printf '%s\n' "subjectAltName=DNS:machinery-tls.test,IP:127.0.0.1" "extendedKeyUsage=serverAuth" \
      "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out server.pem 2>/dev/null
    rm -f server.csr server.ext
    # A RabbitMQ node may run as another user than the one who made the files.
    chmod 644 ca.pem server.pem server.key
  )
}

# Whether the TLS listener on port $1 presents a certificate of our CA: one that another checkout
# started presents its own, and the tests here would fail against it.
tls_ours() {
  local out
  out=$(timeout 10 openssl s_client -connect "127.0.0.1:$1" -CAfile "$tls_dir/ca.pem" \
    -verify_return_error -brief </dev/null 2>&1) || true
  [[ $out == *"CONNECTION ESTABLISHED"* ]]
}

# Whether a TLS listener on port $1 ($2: its name) is up with our certificate; fails if it is up with
# another one.
tls_running() {
  reachable 127.0.0.1 "$1" || return 1
  if tls_ours "$1"; then log "$2 :$1: running"; return 0; fi
  log "$2 :$1 is up but presents a certificate of another CA than $tls_dir/ca.pem (started by another"
  log "checkout?): stop it with scripts/services.sh down there, then run this again"
  exit 1
}

redis_tls_up() {
  if tls_running 6390 "redis tls"; then return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  log "redis tls :6390: starting (client certificates required)"
  redis-server --daemonize yes --bind 127.0.0.1 --port 0 --tls-port 6390 \
    --tls-cert-file "$PWD/$tls_dir/server.pem" --tls-key-file "$PWD/$tls_dir/server.key" \
    --tls-ca-cert-file "$PWD/$tls_dir/ca.pem" --tls-auth-clients yes --save '' --appendonly no \
    --logfile "$PWD/$state_dir/redis-tls.log" --pidfile "$PWD/$state_dir/redis-tls.pid"
  touch "$state_dir/started-redis-tls"
  wait_for "redis tls" 6390 20
}

# A certificate for the TLS cluster's own connections (each node's cluster bus links to the others, and
# redis-cli creating the cluster): the nodes require client certificates, and server.pem is for
# serverAuth only. Made again after the CA.
tls_node_cert() {
  if [ -f "$tls_dir/node.pem" ] && [ -f "$tls_dir/node.key" ] && [ "$tls_dir/node.pem" -nt "$tls_dir/ca.pem" ]; then
    return
  fi
  log "tls: making the TLS cluster nodes' client certificate in $tls_dir"
  (
    cd "$tls_dir"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -subj "/CN=machinery-tls-node" -keyout node.key -out node.csr 2>/dev/null
    printf '%s\n' "extendedKeyUsage=clientAuth" "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature" >node.ext
    openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile node.ext -out node.pem 2>/dev/null
    rm -f node.csr node.ext
    chmod 644 node.pem node.key
  )
}

tls_cluster_ports=(7100 7101 7102)

# A Redis Cluster over TLS only, requiring client certificates: 3 masters, no replicas, on
# 127.0.0.1:7100-7102 (cluster bus over TLS on 17100-17102), serving the certificate of the other TLS
# listeners (it names 127.0.0.1, the address the nodes announce). tests/tests/tls.rs runs a task over it.
tls_cluster_node_up() { # port
  local port=$1 dir="$PWD/$state_dir/tls-cluster/$1" tls="$PWD/$tls_dir"
  mkdir -p "$dir"
  redis-server --daemonize yes --bind 127.0.0.1 --port 0 --tls-port "$port" --dir "$dir" \
    --tls-cert-file "$tls/server.pem" --tls-key-file "$tls/server.key" \
    --tls-client-cert-file "$tls/node.pem" --tls-client-key-file "$tls/node.key" \
    --tls-ca-cert-file "$tls/ca.pem" --tls-auth-clients yes --tls-cluster yes \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --save '' --appendonly no --logfile "$dir/redis.log" --pidfile "$dir/redis.pid"
}

tls_cli() { # redis-cli arguments...
  redis-cli --tls --cacert "$tls_dir/ca.pem" --cert "$tls_dir/node.pem" --key "$tls_dir/node.key" "$@"
}

tls_cluster_ok_nodes() { # how many nodes report cluster_state:ok
  local port n=0
  for port in "${tls_cluster_ports[@]}"; do
    if tls_cli -p "$port" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then n=$((n + 1)); fi
  done
  echo "$n"
}

tls_cluster_up() {
  local port running=0 i
  for port in "${tls_cluster_ports[@]}"; do
    if reachable 127.0.0.1 "$port"; then running=$((running + 1)); fi
  done
  if [ "$running" -ne 0 ]; then
    if tls_running 7100 "redis tls cluster" \
      && [ "$(tls_cluster_ok_nodes)" -eq "${#tls_cluster_ports[@]}" ]; then
      return
    fi
    log "redis tls cluster: some of 127.0.0.1:7100-7102 are taken but no healthy cluster answers there"
    return 1
  fi
  command -v redis-server >/dev/null || apt_install redis-server
  log "redis tls cluster :7100-7102: starting (client certificates required)"
  rm -rf "$state_dir/tls-cluster"
  for port in "${tls_cluster_ports[@]}"; do
    tls_cluster_node_up "$port"
    echo "$port" >>"$state_dir/started-tls-cluster"
  done
  for port in "${tls_cluster_ports[@]}"; do wait_for "redis tls cluster node :$port" "$port" 20; done
  tls_cli --cluster create 127.0.0.1:7100 127.0.0.1:7101 127.0.0.1:7102 --cluster-replicas 0 \
    --cluster-yes >/dev/null
  for ((i = 0; i < 300; i++)); do
    if [ "$(tls_cluster_ok_nodes)" -eq "${#tls_cluster_ports[@]}" ]; then
      log "redis tls cluster :7100-7102: ok"; return 0
    fi
    sleep 0.1
  done
  log "redis tls cluster did not reach cluster_state:ok within 30s"
  return 1
}

tls_cluster_down() {
  [ -f "$state_dir/started-tls-cluster" ] || return 0
  local port
  while read -r port; do
    stop_pid "redis tls cluster node :$port" "$state_dir/tls-cluster/$port/redis.pid"
  done <"$state_dir/started-tls-cluster"
  rm -f "$state_dir/started-tls-cluster"
}

tls_sentinel_dir="$state_dir/tls-sentinel"

# A Redis Sentinel over TLS only, requiring client certificates: a master on :6391 (no replica) and one
# sentinel on :26390 watching it as `tlsmaster`, both with the TLS listeners' certificate (node.pem for
# the sentinel's own connections to the master). tests/tests/tls.rs runs a task through it.
tls_sentinel_up() {
  local tls="$PWD/$tls_dir" dir="$PWD/$tls_sentinel_dir"
  if reachable 127.0.0.1 6391 || reachable 127.0.0.1 26390; then
    if tls_running 6391 "redis tls sentinel master" && tls_running 26390 "redis tls sentinel"; then
      return
    fi
    log "redis tls sentinel: only one of 127.0.0.1:6391 and :26390 answers"
    return 1
  fi
  command -v redis-server >/dev/null || apt_install redis-server
  log "redis tls sentinel: starting (master :6391, sentinel :26390, client certificates required)"
  rm -rf "$tls_sentinel_dir"
  mkdir -p "$tls_sentinel_dir"
  local common=(--bind 127.0.0.1 --port 0 --dir "$dir" --tls-cert-file "$tls/server.pem"
    --tls-key-file "$tls/server.key" --tls-client-cert-file "$tls/node.pem"
    --tls-client-key-file "$tls/node.key" --tls-ca-cert-file "$tls/ca.pem" --tls-auth-clients yes
    --tls-replication yes --daemonize yes)
  redis-server "${common[@]}" --tls-port 6391 --save '' --appendonly no \
    --logfile "$dir/redis-6391.log" --pidfile "$dir/redis-6391.pid"
  echo 6391 >>"$state_dir/started-tls-sentinel"
  # A sentinel rewrites its configuration file as it learns the topology: a fresh one each start.
  echo "sentinel monitor tlsmaster 127.0.0.1 6391 1" >"$tls_sentinel_dir/sentinel.conf"
  redis-server "$dir/sentinel.conf" --sentinel "${common[@]}" --tls-port 26390 \
    --logfile "$dir/sentinel-26390.log" --pidfile "$dir/redis-26390.pid"
  echo 26390 >>"$state_dir/started-tls-sentinel"
  wait_for "redis tls sentinel master" 6391 20
  wait_for "redis tls sentinel" 26390 20
}

tls_sentinel_down() {
  [ -f "$state_dir/started-tls-sentinel" ] || return 0
  local port
  while read -r port; do
    stop_pid "redis tls sentinel :$port" "$tls_sentinel_dir/redis-$port.pid"
  done <"$state_dir/started-tls-sentinel"
  rm -f "$state_dir/started-tls-sentinel"
}

rabbitmq_tls_dir="$state_dir/rabbitmq-tls"

# Runs a RabbitMQ command ($1: rabbitmq-server, rabbitmqctl) for the TLS node, with its own node name,
# distribution port, data, logs, configuration, plugins and Erlang cookie (its own HOME): it shares
# nothing with the machine's node on :5672 but epmd.
rabbitmq_tls() {
  local command=$1 dir="$PWD/$rabbitmq_tls_dir" bin
  shift
  # Debian's rabbitmq-server is a wrapper that switches to the rabbitmq user and drops our variables:
  # run the real script beside it.
  bin=$(dirname "$(readlink -f "$(command -v rabbitmq-server)")")
  [ -x "$bin/$command" ] || bin=$(dirname "$(command -v rabbitmq-server)")
  env HOME="$dir/home" RABBITMQ_NODENAME=machinery-tls@localhost RABBITMQ_DIST_PORT=25676 \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_PID_FILE="$dir/pid" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" "$bin/$command" "$@"
}

rabbitmq_tls_up() {
  if tls_running 5676 "rabbitmq tls"; then return; fi
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  local dir="$PWD/$rabbitmq_tls_dir" i
  mkdir -p "$dir/home" "$dir/mnesia" "$dir/log"
  {
    echo "listeners.tcp = none"
    echo "listeners.ssl.default = 5676"
    echo "ssl_options.cacertfile = $PWD/$tls_dir/ca.pem"
    echo "ssl_options.certfile = $PWD/$tls_dir/server.pem"
    echo "ssl_options.keyfile = $PWD/$tls_dir/server.key"
    echo "ssl_options.verify = verify_peer"
    echo "ssl_options.fail_if_no_peer_cert = true"
  } >"$dir/rabbitmq.conf"
  echo '[].' >"$dir/enabled_plugins"
  log "rabbitmq tls :5676: starting node machinery-tls@localhost (client certificates required)"
  rabbitmq_tls rabbitmq-server -detached
  touch "$state_dir/started-rabbitmq-tls"
  for ((i = 0; i < 120; i++)); do
    if rabbitmq_tls rabbitmqctl await_startup --timeout 5 >/dev/null 2>&1; then break; fi
    sleep 1
  done
  wait_for "rabbitmq tls" 5676 60
}

tls_down() {
  tls_cluster_down
  tls_sentinel_down
  if [ -f "$state_dir/started-redis-tls" ]; then
    stop_pid "redis tls :6390" "$state_dir/redis-tls.pid"
    rm -f "$state_dir/started-redis-tls"
  fi
  if [ -f "$state_dir/started-rabbitmq-tls" ]; then
    if rabbitmq_tls rabbitmqctl shutdown >/dev/null 2>&1; then
      log "rabbitmq tls :5676: stopped"
    else
      stop_pid "rabbitmq tls :5676" "$rabbitmq_tls_dir/pid"
    fi
    rm -f "$state_dir/started-rabbitmq-tls"
  fi
}

cluster_ports=(7000 7001 7002 7003 7004 7005)

# A Redis Cluster of 3 masters and 3 replicas on 127.0.0.1:7000-7005 (cluster bus on 17000-17005), each
# node with a directory of its own under target/services/cluster/<port>. The cluster tests fail over and
# kill nodes, and restart a killed one as a replica (tests/src/cluster.rs), so whichever node is master
# where does not matter; `down` stops the nodes this script started.
cluster_node_up() { # port
  local port=$1 dir="$PWD/$state_dir/cluster/$1"
  mkdir -p "$dir"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$dir" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --save '' --appendonly no --logfile "$dir/redis.log" --pidfile "$dir/redis.pid"
}

cluster_up() {
  local port running=0
  for port in "${cluster_ports[@]}"; do
    if reachable 127.0.0.1 "$port"; then running=$((running + 1)); fi
  done
  if [ "$running" -eq "${#cluster_ports[@]}" ] \
    && redis-cli -p 7000 cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then
    log "redis cluster :7000-7005: running"; return
  fi
  if [ "$running" -ne 0 ]; then
    log "redis cluster: some of 127.0.0.1:7000-7005 are taken but no healthy cluster answers there"
    return 1
  fi
  command -v redis-server >/dev/null || apt_install redis-server
  log "redis cluster :7000-7005: starting"
  rm -rf "$state_dir/cluster"
  for port in "${cluster_ports[@]}"; do
    cluster_node_up "$port"
    echo "$port" >>"$state_dir/started-cluster"
  done
  for port in "${cluster_ports[@]}"; do wait_for "redis cluster node :$port" "$port" 20; done
  redis-cli --cluster create 127.0.0.1:7000 127.0.0.1:7001 127.0.0.1:7002 \
    127.0.0.1:7003 127.0.0.1:7004 127.0.0.1:7005 --cluster-replicas 1 --cluster-yes >/dev/null
  local i
  for ((i = 0; i < 300; i++)); do
    if [ "$(cluster_ok_nodes)" -eq "${#cluster_ports[@]}" ]; then
      log "redis cluster :7000-7005: ok"; return 0
    fi
    sleep 0.1
  done
  log "redis cluster did not reach cluster_state:ok within 30s"
  return 1
}

cluster_ok_nodes() { # how many nodes report cluster_state:ok
  local port n=0
  for port in "${cluster_ports[@]}"; do
    if redis-cli -p "$port" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then n=$((n + 1)); fi
  done
  echo "$n"
}

cluster_down() {
  [ -f "$state_dir/started-cluster" ] || return 0
  local port pidfile pid i
  while read -r port; do
    pidfile="$state_dir/cluster/$port/redis.pid"
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$pidfile"
    fi
  done <"$state_dir/started-cluster"
  rm -f "$state_dir/started-cluster"
  log "redis cluster :7000-7005: stopped"
}

down() {
  tls_down
  cluster_down
  if [ -f "$state_dir/started-rabbitmq-cluster" ]; then
    for n in 1 2 3; do
      {
        rabbitmq_node "$n" rabbitmqctl shutdown >/dev/null 2>&1 ||
          stop_pid "rabbitmq cluster node c$n" "$rabbitmq_cluster_dir/c$n/pid"
      } &
    done
    wait
    log "rabbitmq cluster :5673-:5675: stopped"
    rm -f "$state_dir/started-rabbitmq-cluster"
  fi
  if [ -f "$state_dir/started-sentinel" ]; then
    while read -r port; do stop_pid "redis :$port" "$sentinel_dir/redis-$port.pid"; done \
      <"$state_dir/started-sentinel"
    rm -f "$state_dir/started-sentinel"
  fi
  if [ -f "$state_dir/started-redis" ]; then
    stop_pid redis "$state_dir/redis.pid"
    rm -f "$state_dir/started-redis"
  fi
  if [ -f "$state_dir/started-rabbitmq" ]; then
    as_root rabbitmqctl shutdown >/dev/null 2>&1 && log "rabbitmq: stopped"
    rm -f "$state_dir/started-rabbitmq"
  fi
  if [ -f "$state_dir/started-memcached" ]; then
    while read -r port; do
      pidfile="$state_dir/memcached-$port.pid"
      if [ -f "$pidfile" ]; then
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$pidfile"
        log "memcached :$port: stopped"
      fi
    done <"$state_dir/started-memcached"
    rm -f "$state_dir/started-memcached"
  fi
}

case "${1:-up}" in
  up)
    redis_up
    rabbitmq_up
    rabbitmq_cluster_start
    memcached_up 11211
    memcached_up 11212
    browser_up
    tls_certs
    tls_node_cert
    redis_tls_up
    tls_cluster_up
    tls_sentinel_up
    rabbitmq_tls_up
    cluster_up
    sentinel_up
    rabbitmq_cluster_wait
    ;;
  down) down ;;
  # rabbitmqctl on one node of the RabbitMQ cluster (its cookie and name), e.g. `rabbitmqctl 2 stop_app`.
  rabbitmqctl) shift; node=$1; shift; rabbitmq_node "$node" rabbitmqctl "$@" ;;
  # Starts a data server of the Sentinel set again (after a test killed it), e.g. `sentinel-redis 6380`.
  sentinel-redis) sentinel_redis "$2"; wait_for "redis :$2" "$2" 20 ;;
  *) echo "usage: $0 up|down|rabbitmqctl <1-3> <command>...|sentinel-redis <port>" >&2; exit 2 ;;
esac
