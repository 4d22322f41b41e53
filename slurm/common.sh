# shellcheck shell=bash disable=SC2034
# Shared helpers for start_cluster.sh / stop_cluster.sh. Sourced, not executed.

BASE="${SLURM_BASE:-/tmp/clbench-slurm}"
BASE="${BASE%/}"
ETC="$BASE/etc"
PIDS="$BASE/pids"
LOGS="$BASE/log"
CONF="$ETC/slurm.conf"
DBD_CONF="$ETC/slurmdbd.conf"
MARKER="$BASE/.clbench-slurm"     # proves a directory was made by start_cluster.sh
LINKS_FILE="$BASE/links"          # /etc paths that start_cluster.sh symlinked
DB_PORT="${SLURM_DB_PORT:-3307}"
MYSQL_SOCK="$BASE/mysqlrun/mysqld.sock"

T0=$(date +%s.%N)
# log MESSAGE: "[HH:MM:SS +elapsed] prog: MESSAGE" on stdout
log()  { echo "[$(date +%H:%M:%S) +$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s] $PROG: $*"; }
warn() { echo "$PROG: WARNING: $*" >&2; }

# Process start time (clock ticks since boot, field 22 of /proc/PID/stat).
proc_starttime() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }                 # drop "pid (comm) "; comm may contain spaces
    # shellcheck disable=SC2086
    set -- $stat                      # now $1 is field 3 (state), so starttime is $20
    echo "${20}"
}

# Does PID (still) belong to the daemon NAME that we started for this BASE?
# Checks: alive, argv[0] basename == NAME, start time unchanged since we recorded it,
# and (where possible) that it belongs to this BASE.
pid_is_ours() {
    local name=$1 pid=$2 argv0 cmdline want_start have_start
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [ -r "/proc/$pid/cmdline" ] || return 1
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    [ -n "$cmdline" ] || return 1      # zombie / kernel thread
    argv0=${cmdline%% *}
    [ "${argv0##*/}" = "$name" ] || return 1
    if [ -f "$PIDS/$name.start" ]; then
        want_start=$(cat "$PIDS/$name.start" 2>/dev/null)
        have_start=$(proc_starttime "$pid") || return 1
        [ "$want_start" = "$have_start" ] || return 1
    fi
    case $name in
        mariadbd) [[ "$cmdline" == *"--datadir=$BASE/mysql "* ]] || return 1 ;;
        slurmctld|slurmd|slurmdbd)
            grep -qzxF "SLURM_CONF=$CONF" "/proc/$pid/environ" 2>/dev/null || return 1 ;;
    esac
    return 0
}

# PID recorded for NAME if that process is still ours, else nothing (and status 1).
our_pid() {
    local name=$1 pid
    [ -f "$PIDS/$name.pid" ] || return 1
    pid=$(cat "$PIDS/$name.pid" 2>/dev/null)
    pid_is_ours "$name" "$pid" || return 1
    echo "$pid"
}

record_pid() {   # record_pid NAME PID
    mkdir -p "$PIDS"
    echo "$2" >"$PIDS/$1.pid"
    proc_starttime "$2" >"$PIDS/$1.start" || true
}

forget_pid() { rm -f "$PIDS/$1.pid" "$PIDS/$1.start"; }

# Is some socket LISTENing on TCP port PORT (any address)? Reads /proc/net/tcp{,6} rather than
# connecting, because a probe connection makes the slurm daemons log "Zero Bytes were transmitted".
port_open() {
    local hex
    hex=$(printf ':%04X' "$1")
    awk -v p="$hex" 'FNR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# Client-side environment: always talk to *our* cluster, whatever /etc/slurm holds.
slurm_env() { env SLURM_CONF="$CONF" "$@"; }
