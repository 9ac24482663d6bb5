# Shared by slurm-cluster.sh and docker-engine.sh (sourced): daemons known by PID file.

# pid_alive PIDFILE COMM: the PID in PIDFILE is a live process named COMM (not a reused PID)
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(tr -dc 0-9 < "$1")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

# stop_pid PIDFILE COMM WAIT_S: SIGTERM the daemon, SIGKILL after WAIT_S, remove PIDFILE
stop_pid() {
    local pidfile=$1 comm=$2 wait_s=$3 pid i
    pid_alive "$pidfile" "$comm" || { rm -f "$pidfile"; return 0; }
    pid=$(tr -dc 0-9 < "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 $((wait_s * 10))); do
        [ -d "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then
        echo "$comm ($pid) did not stop in $wait_s s; killing" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "stopped $comm ($pid)" >&2
}
