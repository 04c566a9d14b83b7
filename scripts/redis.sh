#!/usr/bin/env bash
# Source this: starts a private redis-server on a free loopback port, exports
# HOTWEIGHTS_TEST_REDIS_URL, and stops it (and removes its folder) when the shell exits.
HW_REDIS_DIR="$(mktemp -d -t hotweights-redis.XXXXXX)"
HW_REDIS_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
redis-server --port "$HW_REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --dir "$HW_REDIS_DIR" --pidfile "$HW_REDIS_DIR/redis.pid" --logfile "$HW_REDIS_DIR/redis.log"
hw_redis_stop() {
  if [ -f "$HW_REDIS_DIR/redis.pid" ]; then
    local pid
    pid="$(cat "$HW_REDIS_DIR/redis.pid")"
    kill "$pid" 2>/dev/null || true
    # it writes its last log line while exiting: remove the folder after it is gone
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  fi
  rm -rf "$HW_REDIS_DIR" || true
}
trap hw_redis_stop EXIT
for _ in $(seq 100); do redis-cli -p "$HW_REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
redis-cli -p "$HW_REDIS_PORT" ping >/dev/null || { echo "redis-server did not start" >&2; exit 1; }
export HOTWEIGHTS_TEST_REDIS_URL="redis://127.0.0.1:$HW_REDIS_PORT/0"
