#!/usr/bin/env bash
# The Redis servers the tests talk to, each on a free loopback port, their
# files in one folder:
#   scripts/test-redis.sh start DIR   starts them and prints `export` lines
#   scripts/test-redis.sh stop DIR    stops every server whose pid file is in DIR
#
# - a plain Redis                       FLOE_TEST_REDIS_URL
# - a TLS-only Redis with a throwaway CA FLOE_TEST_REDIS_TLS_URL, FLOE_TEST_REDIS_CA_FILE
# - a Sentinel set: one master, one replica and one sentinel watching
#   them as "floe"                      FLOE_TEST_REDIS_SENTINEL_URL
# FLOE_TEST_REDIS_DIR is DIR: a test that stops a server of the set starts
# it again with its pid file there, so `stop` finds it.
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

if [ "$cmd" = stop ]; then
  shopt -s nullglob
  for pidfile in "$dir"/*.pid; do
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pidfile in "$dir"/*.pid; do
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    for _ in $(seq 50); do
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  done
  exit 0
fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
mkdir -p "$dir"

taken=" "
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local candidate
  for candidate in $(shuf -i 20000-45000 -n 50); do
    if [[ "$taken" != *" $candidate "* ]] && port_free "$candidate"; then
      taken+="$candidate "
      echo "$candidate"
      return
    fi
  done
  echo "no free port for Redis" >&2
  exit 1
}

# Waits until the server on $1 answers PING (redis-cli args follow).
wait_ping() {
  local name="$1"; shift
  for _ in $(seq 100); do
    redis-cli "$@" ping >/dev/null 2>&1 && return
    sleep 0.1
  done
  cat "$dir/$name.log" >&2
  echo "$name did not start" >&2
  exit 1
}

# redis NAME PORT ARGS...: a server in the background, logs and pid in $dir.
redis() {
  local name="$1" port="$2"; shift 2
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$dir" --logfile "$dir/$name.log" --daemonize yes \
    --pidfile "$dir/$name.pid" "$@"
}

plain="$(free_port)"
redis plain "$plain"
wait_ping plain -p "$plain"

# TLS: a throwaway CA and a server certificate for 127.0.0.1.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=floe test CA" \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$dir/san.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
  -CAcreateserial -days 2 -extfile "$dir/san.ext" -out "$dir/server.crt" 2>/dev/null
tls="$(free_port)"
redis tls 0 --tls-port "$tls" --tls-cert-file "$dir/server.crt" \
  --tls-key-file "$dir/server.key" --tls-ca-cert-file "$dir/ca.crt" --tls-auth-clients no
wait_ping tls -p "$tls" --tls --cacert "$dir/ca.crt"

# Sentinel: master, replica, and one sentinel (quorum 1) that fails over
# a second after the master stops answering.
master="$(free_port)"
replica="$(free_port)"
sentinel="$(free_port)"
redis master "$master"
wait_ping master -p "$master"
redis replica "$replica" --replicaof 127.0.0.1 "$master"
wait_ping replica -p "$replica"
cat >"$dir/sentinel.conf" <<EOF
port $sentinel
bind 127.0.0.1
dir $dir
logfile $dir/sentinel.log
pidfile $dir/sentinel.pid
daemonize yes
sentinel monitor floe 127.0.0.1 $master 1
sentinel down-after-milliseconds floe 1000
sentinel failover-timeout floe 5000
EOF
redis-server "$dir/sentinel.conf" --sentinel
wait_ping sentinel -p "$sentinel"
# Ready when the replica has synced and the sentinel knows of it.
ready=""
for _ in $(seq 150); do
  if redis-cli -p "$replica" info replication | grep -q 'master_link_status:up' &&
    redis-cli -p "$sentinel" sentinel replicas floe | grep -q "^$replica\$"; then
    ready=1
    break
  fi
  sleep 0.1
done
[ -n "$ready" ] || { cat "$dir/sentinel.log" >&2; echo "the Sentinel set did not come up" >&2; exit 1; }

cat <<EOF
export FLOE_TEST_REDIS_DIR="$dir"
export FLOE_TEST_REDIS_URL="redis://127.0.0.1:$plain"
export FLOE_TEST_REDIS_TLS_URL="rediss://127.0.0.1:$tls"
export FLOE_TEST_REDIS_CA_FILE="$dir/ca.crt"
export FLOE_TEST_REDIS_SENTINEL_URL="redis+sentinel://127.0.0.1:$sentinel/floe"
EOF
