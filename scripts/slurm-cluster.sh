#!/usr/bin/env bash
# A real single-node SLURM cluster with accounting on this machine, for tests and CI.
#
#   scripts/slurm-cluster.sh start  [STATE_DIR]   # install (apt) if needed, start, wait for idle
#   scripts/slurm-cluster.sh status [STATE_DIR]   # daemons and sinfo
#   scripts/slurm-cluster.sh stop   [STATE_DIR]   # stop the daemons this script started (by PID)
#
# Runs as root. Every daemon (munged, mariadbd, slurmdbd, slurmctld, slurmd) gets its own
# files under STATE_DIR (default /var/tmp/dmriflow-slurm) and its own free ports, so the
# cluster never touches the system's /etc/slurm, /etc/munge key or a running MariaDB, and
# two clusters (two test sessions) can run side by side. Clients find it through
#   export SLURM_CONF=STATE_DIR/etc/slurm.conf      (also in STATE_DIR/cluster.env)
# Partitions on the one node `localhost`: `debug` (default) and `gpu` (no GRES here; it
# stands for a cluster's GPU queue so per-step sbatch arguments can be checked in sacct).
set -euo pipefail

ACTION=${1:-}
STATE=$(realpath -m "${2:-${DMRIFLOW_SLURM_STATE:-/var/tmp/dmriflow-slurm}}")
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
# port blocks taken by clusters of this machine (one file per STATE_DIR) and their lock
PORTS_DIR=/var/tmp/dmriflow-slurm-ports
READY_TIMEOUT_S=${READY_TIMEOUT_S:-60}
# daemons in start order: name, pid file (relative to STATE), process name in /proc/PID/comm
DAEMONS=("munged munge/munged.pid munged" "mariadbd run/mariadbd.pid mariadbd"
         "slurmdbd run/slurmdbd.pid slurmdbd" "slurmctld run/slurmctld.pid slurmctld"
         "slurmd run/slurmd.pid slurmd")

. "$(dirname "$0")/daemon-lib.sh"

say() { echo "[slurm-cluster] $*" >&2; }
die() { say "error: $*"; exit 1; }

export SLURM_CONF="$STATE/etc/slurm.conf"

install_packages() {
    local missing="" pkg
    for pkg in $PACKAGES; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
    done
    [ -z "$missing" ] && return 0
    say "installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_ports() {   # first block of 4 free ports from 16800 in steps of 10
    local base p
    for base in $(seq 16800 10 17800); do
        for p in $base $((base + 1)) $((base + 2)) $((base + 3)); do
            listening "$p" && continue 2
        done
        # a block named by another cluster that is still starting counts as taken
        grep -qsx "PORT_BASE=$base" "$PORTS_DIR"/_* && continue
        echo "$base"; return 0
    done
    die "no free port block between 16800 and 17800"
}

wait_for() {   # seconds, description, command...
    local limit=$1 what=$2 t0=$SECONDS; shift 2
    until "$@" >/dev/null 2>&1; do
        [ $((SECONDS - t0)) -ge "$limit" ] && return 1
        sleep 0.2
    done
    say "$what ready after $((SECONDS - t0)) s"
}

# a daemon must not hold the caller's pipes or the port lock open
detached() { "$@" >> "$STATE/log/daemons.out" 2>&1 < /dev/null 9>&-; }

node_idle() { [ "$(sinfo -h -n localhost -o %t 2>/dev/null | sort -u)" = "idle" ]; }

write_configs() {   # port base, db password
    local base=$1 pw=$2 cpus mem
    cpus=$(nproc)
    mem=$(awk '/^MemTotal:/{print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat > "$STATE/etc/slurm.conf" <<EOF
ClusterName=dmriflow
SlurmctldHost=localhost
SlurmctldPort=$base
SlurmdPort=$((base + 1))
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((base + 2))
AccountingStoragePass=$STATE/munge/munge.socket
AccountingStoreFlags=job_comment
MinJobAge=30
KillWait=5
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP
EOF
    cat > "$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
DbdHost=localhost
DbdPort=$((base + 2))
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((base + 3))
StorageUser=slurm
StoragePass=$pw
StorageLoc=slurm_acct_db
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
EOF
    chmod 600 "$STATE/etc/slurmdbd.conf"
    printf 'export SLURM_CONF=%s\n' "$SLURM_CONF" > "$STATE/cluster.env"
}

start_munge() {
    mkdir -p "$STATE/munge"
    [ -s "$STATE/munge/munge.key" ] || mungekey --create --keyfile="$STATE/munge/munge.key"
    chown -R munge:munge "$STATE/munge"
    chmod 755 "$STATE/munge"   # munged wants the socket folder open to all; chmod 600 "$STATE/munge/munge.key"
    detached runuser -u munge -- munged --socket="$STATE/munge/munge.socket" \
        --key-file="$STATE/munge/munge.key" --pid-file="$STATE/munge/munged.pid" \
        --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
    wait_for 20 munged munge -S "$STATE/munge/munge.socket" -n \
        || die "munged did not start (see $STATE/munge/munged.log)"
}

start_mariadb() {   # port, password
    local port=$1 pw=$2 sql=(mariadb --no-defaults -S "$STATE/mysql/mysqld.sock" -uroot)
    mkdir -p "$STATE/mysql/data"
    chown -R mysql:mysql "$STATE/mysql"
    if [ ! -d "$STATE/mysql/data/mysql" ]; then
        mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql/data" \
            --auth-root-authentication-method=socket --skip-test-db \
            > "$STATE/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
    fi
    # the pid file must be in a folder mysql can write, or mariadbd crashes on start
    mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql/data" \
        --socket="$STATE/mysql/mysqld.sock" --port="$port" --bind-address=127.0.0.1 \
        --skip-name-resolve --pid-file="$STATE/mysql/mariadbd.pid" \
        --log-error="$STATE/log/mariadb.log" --innodb-buffer-pool-size=32M \
        >> "$STATE/log/daemons.out" 2>&1 < /dev/null 9>&- &
    echo $! > "$STATE/run/mariadbd.pid"
    wait_for 60 mariadbd "${sql[@]}" -e "select 1" \
        || die "mariadbd did not start (see $STATE/log/mariadb.log)"
    "${sql[@]}" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start() {
    [ "$(id -u)" = 0 ] || die "must run as root (starts munged, mariadbd and the SLURM daemons)"
    if [ -s "$STATE/cluster.env" ] && pid_alive "$STATE/run/slurmctld.pid" slurmctld \
            && node_idle; then
        say "already running: $SLURM_CONF"; echo "export SLURM_CONF=$SLURM_CONF"; return 0
    fi
    install_packages
    local t0=$SECONDS base pw
    # a failed start stops whatever it had started
    trap 'rc=$?; if [ $rc -ne 0 ]; then say "start failed; last daemon output: $(tail -n 3 "$STATE/log/daemons.out" 2>/dev/null)"; stop; fi' EXIT
    mkdir -p "$STATE"/{etc,state,spool,run,log} "$PORTS_DIR"
    chmod 755 "$STATE"
    runuser -u mysql -- test -x "$STATE" \
        || die "$STATE is not reachable by the mysql user (a parent folder is private)"
    exec 9> "$PORTS_DIR/.lock"
    flock 9
    base=$(pick_ports)
    echo "PORT_BASE=$base" > "$PORTS_DIR/$(echo "$STATE" | tr / _)"
    pw=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
    write_configs "$base" "$pw"
    start_munge
    start_mariadb $((base + 3)) "$pw"
    detached slurmdbd
    wait_for 30 slurmdbd listening $((base + 2)) \
        || die "slurmdbd did not start (see $STATE/log/slurmdbd.log)"
    detached slurmctld
    wait_for 30 slurmctld scontrol ping \
        || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
    detached slurmd -N localhost
    flock -u 9
    wait_for "$READY_TIMEOUT_S" "node idle" node_idle \
        || die "node not idle after ${READY_TIMEOUT_S} s: $(sinfo 2>&1) (see $STATE/log)"
    trap - EXIT
    say "cluster up in $((SECONDS - t0)) s; partitions: $(sinfo -h -o '%P' | tr '\n' ' ')"
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop_daemon() {   # name: its pid file and comm from DAEMONS
    local entry d
    for entry in "${DAEMONS[@]}"; do
        read -r -a d <<< "$entry"
        [ "${d[0]}" = "$1" ] && stop_pid "$STATE/${d[1]}" "${d[2]}" 10
    done
    return 0
}

stop() {
    [ -d "$STATE" ] || { say "no cluster state at $STATE"; return 0; }
    if pid_alive "$STATE/run/slurmctld.pid" slurmctld; then
        # only this cluster's jobs: the clients talk to the controller named in SLURM_CONF
        scancel --partition=debug,gpu --full 2>/dev/null || true
    fi
    local stage name stoppers
    # each stage's daemons together; a stage's clients stop before the servers they flush to
    # (wait for the stoppers only: a failed start's mariadbd is a child of this shell too)
    for stage in "slurmd slurmctld" slurmdbd "mariadbd munged"; do
        stoppers=()
        for name in $stage; do stop_daemon "$name" & stoppers+=($!); done
        wait "${stoppers[@]}"
    done
    rm -f "$PORTS_DIR/$(echo "$STATE" | tr / _)"
}

status() {
    local d alive=0
    for entry in "${DAEMONS[@]}"; do
        read -r -a d <<< "$entry"
        if pid_alive "$STATE/${d[1]}" "${d[2]}"; then
            echo "${d[0]}: running (pid $(tr -dc 0-9 < "$STATE/${d[1]}"))"; alive=$((alive + 1))
        else
            echo "${d[0]}: not running"
        fi
    done
    [ "$alive" -eq "${#DAEMONS[@]}" ] || return 1
    echo "export SLURM_CONF=$SLURM_CONF"
    sinfo
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [STATE_DIR]" >&2; exit 2 ;;
esac
