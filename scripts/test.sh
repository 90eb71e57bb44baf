#!/usr/bin/env bash
# Run the whole test suite, then the queue tests once more against Debian's
# redis-server through REDIS_URL (installed with apt-get when running as root), and
# once more against a Redis Cluster of it (issue 21).
set -euo pipefail
cd "$(dirname "$0")/.."

# Installed before the first pass: tests/e2e/test_compose.py needs both redis-server and
# docker-compose (it skips without them).
if ! command -v redis-server >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server docker-compose) >/dev/null \
        || echo "== apt-get could not install redis-server and docker-compose: their tests will skip"
fi

# The lint and type gates first (seconds): a finding fails the run before any test starts.
# ruff reads [tool.ruff] (it skips .gitignore'd paths: .venv, the generated latentserve/v1);
# mypy reads [tool.mypy] (strict, over the latentserve package).
echo "== ruff check ."
python -m ruff check .
echo "== mypy (strict, package latentserve)"
python -m mypy

python -m pytest -q "$@"

if command -v redis-server >/dev/null; then
    state=$(mktemp -d)
    port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    redis-server --port "$port" --bind 127.0.0.1 --dir "$state" --appendonly yes --save "" --daemonize yes \
        --pidfile "$state/redis.pid" --logfile "$state/redis.log"
    trap 'kill "$(cat "$state/redis.pid")" 2>/dev/null || true; rm -rf "$state"' EXIT
    for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    echo "== queue tests against redis-server $(redis-server --version | awk '{print $3}') on port $port"
    REDIS_URL="redis://127.0.0.1:$port/0" python -m pytest -q -m queue

    # Third pass: the same queue tests on a Redis Cluster (3 masters + 3 replicas of
    # redis-server on loopback, tests/redis_cluster.py), through redis-py's RedisCluster.
    cluster_dir=$(mktemp -d)
    python tests/redis_cluster.py "$cluster_dir" >"$cluster_dir/url" 2>"$cluster_dir/err" &
    cluster_pid=$!
    trap 'kill "$(cat "$state/redis.pid")" 2>/dev/null || true; kill "$cluster_pid" 2>/dev/null || true; wait "$cluster_pid" 2>/dev/null || true; rm -rf "$state" "$cluster_dir"' EXIT
    for _ in $(seq 600); do [ -s "$cluster_dir/url" ] || ! kill -0 "$cluster_pid" 2>/dev/null && break; sleep 0.1; done
    if [ ! -s "$cluster_dir/url" ]; then
        cat "$cluster_dir/err"; echo "== the Redis Cluster did not start"; exit 1
    fi
    echo "== queue tests against a Redis Cluster of redis-server (3 masters, 3 replicas)"
    REDIS_URL="$(cat "$cluster_dir/url")" python -m pytest -q -m queue
else
    echo "== redis-server not installed and not root: skipped the second and third (cluster) queue passes (CI runs them)"
fi
