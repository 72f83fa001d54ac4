#!/usr/bin/env bash
# Makes the servers the test suite talks to available on 127.0.0.1, the way a fresh Debian machine needs:
# check each one, start it if it is installed but stopped, install it with apt-get if it is missing.
#
#   scripts/services.sh up     # Redis :6379, RabbitMQ :5672, memcached :11211 and :11212,
#                              # a Redis Cluster of 3 masters + 3 replicas on :7000-7005
#   scripts/services.sh down   # stops what `up` started (and only that)
#
# State (what we started) is kept in target/services/.
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
  wait_for redis 6379 20
}

rabbitmq_up() {
  if reachable 127.0.0.1 5672; then log "rabbitmq: running"; return; fi
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  log "rabbitmq: starting"
  as_root rabbitmq-server -detached
  as_root timeout 120 rabbitmqctl await_startup >/dev/null
  wait_for rabbitmq 5672 60
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
  cluster_down
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
    memcached_up 11211
    memcached_up 11212
    cluster_up
    ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
