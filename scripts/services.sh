#!/usr/bin/env bash
# Makes the servers the test suite talks to available on 127.0.0.1, the way a fresh Debian machine needs:
# check each one, start it if it is installed but stopped, install it with apt-get if it is missing.
#
#   scripts/services.sh up     # Redis :6379, RabbitMQ :5672, memcached :11211 and :11212, and
#                              # Chromium with chromedriver for the dashboard's browser test (installed
#                              # only: the test starts chromedriver on a free port and stops it)
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

browser_up() {
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    log "chromium and chromedriver: installed"; return
  fi
  apt_install chromium chromium-driver
  command -v chromedriver >/dev/null || { log "chromedriver is still missing after apt-get"; return 1; }
}

down() {
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
    browser_up
    ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
