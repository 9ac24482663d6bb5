#!/usr/bin/env bash
# A Docker engine of our own, for building and testing the image (tests, CI).
#
#   scripts/docker-engine.sh start  STATE_DIR   # install docker.io if needed, start dockerd
#   scripts/docker-engine.sh status STATE_DIR
#   scripts/docker-engine.sh stop   STATE_DIR   # stop the dockerd started with STATE_DIR (PID)
#
# Runs as root. dockerd keeps its images under STATE_DIR/data (so a later start reuses the
# build cache) and listens on its own socket, never the system's /var/run/docker.sock:
#   export DOCKER_HOST=unix://STATE_DIR/docker.sock        (also in STATE_DIR/engine.env)
# `start` on a running engine reuses it. Use /usr/bin/docker (Debian's client): another
# client earlier on PATH may lack the builder this engine expects.
set -euo pipefail

ACTION=${1:-}
[ -n "${2:-}" ] || { echo "usage: $0 start|stop|status STATE_DIR" >&2; exit 2; }
STATE=$(realpath -m "$2")
DOCKER=/usr/bin/docker
export DOCKER_HOST="unix://$STATE/docker.sock"
READY_TIMEOUT_S=${READY_TIMEOUT_S:-60}

. "$(dirname "$0")/daemon-lib.sh"

say() { echo "[docker-engine] $*" >&2; }
die() { say "error: $*"; exit 1; }

engine_alive() { pid_alive "$STATE/dockerd.pid" dockerd; }

responds() { "$DOCKER" version >/dev/null 2>&1; }

start() {
    [ "$(id -u)" = 0 ] || die "must run as root (starts dockerd)"
    if ! [ -x /usr/sbin/dockerd ] || ! [ -x "$DOCKER" ]; then
        say "installing docker.io"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends docker.io >/dev/null
    fi
    mkdir -p "$STATE/data" "$STATE/exec"
    exec 9> "$STATE/.start.lock"
    flock 9    # one start at a time per STATE_DIR
    if engine_alive && responds; then
        say "already running: $DOCKER_HOST"
    else
        local t0=$SECONDS
        rm -f "$STATE/docker.sock" "$STATE/dockerd.pid"
        /usr/sbin/dockerd --data-root "$STATE/data" --exec-root "$STATE/exec" \
            --pidfile "$STATE/dockerd.pid" --host "$DOCKER_HOST" \
            >> "$STATE/dockerd.log" 2>&1 < /dev/null 9>&- &
        until responds; do
            kill -0 $! 2>/dev/null || die "dockerd exited: $(tail -n 5 "$STATE/dockerd.log")"
            [ $((SECONDS - t0)) -ge "$READY_TIMEOUT_S" ] && {
                stop; die "dockerd not ready after ${READY_TIMEOUT_S} s (see $STATE/dockerd.log)"; }
            sleep 0.2
        done
        say "dockerd ready after $((SECONDS - t0)) s (pid $(cat "$STATE/dockerd.pid"))"
    fi
    printf 'export DOCKER_HOST=%s\n' "$DOCKER_HOST" > "$STATE/engine.env"
    echo "export DOCKER_HOST=$DOCKER_HOST"
}

stop() {
    engine_alive || { say "no dockerd running for $STATE"; rm -f "$STATE/dockerd.pid"; return 0; }
    stop_pid "$STATE/dockerd.pid" dockerd 30    # dockerd stops containers and containerd first
}

status() {
    engine_alive && responds || { echo "dockerd: not running for $STATE"; return 1; }
    echo "dockerd: running (pid $(tr -dc 0-9 < "$STATE/dockerd.pid"))"
    echo "export DOCKER_HOST=$DOCKER_HOST"
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status STATE_DIR" >&2; exit 2 ;;
esac
