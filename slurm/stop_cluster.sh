#!/usr/bin/env bash
# Stop the daemons that start_cluster.sh started (and only those), by their recorded PIDs.
# Idempotent. Usage: stop_cluster.sh [--purge]   (--purge also deletes $SLURM_BASE)
#
# Environment:
#   SLURM_BASE          state directory (default /tmp/clbench-slurm)
#   SLURM_STOP_WAIT_S   seconds to wait after SIGTERM before SIGKILL (default 20)
set -euo pipefail
PROG=stop_cluster.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

PURGE=0
for a in "$@"; do
    case $a in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "$PROG: ERROR: unknown argument '$a' (usage: $PROG [--purge])" >&2; exit 2 ;;
    esac
done
STOP_WAIT_S="${SLURM_STOP_WAIT_S:-20}"
[ "$(id -u)" = 0 ] || { echo "$PROG: ERROR: must run as root" >&2; exit 1; }
[[ "$BASE" = /* ]] && [ "$BASE" != / ] || { echo "$PROG: ERROR: bad SLURM_BASE '$BASE'" >&2; exit 1; }

if [ ! -f "$MARKER" ]; then
    if [ "$PURGE" = 1 ] && [ -e "$BASE" ]; then
        echo "$PROG: ERROR: $BASE was not created by start_cluster.sh (no $MARKER); not deleting it" >&2
        exit 1
    fi
    log "nothing to stop (no cluster state in $BASE)"
    exit 0
fi
exec 9>"$BASE/.lock"
flock -w 120 9 || { echo "$PROG: ERROR: another start/stop of $BASE is still running" >&2; exit 1; }
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

# 1. Cancel the jobs of this private cluster, so that no slurmstepd outlives slurmd.
#    (Only worth waiting for when our slurmd is alive to carry the cancellation out.)
if our_pid slurmctld >/dev/null && our_pid slurmd >/dev/null; then
    jobs=$(slurm_env squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        slurm_env scancel $jobs >/dev/null 2>&1 || true
        for ((i = 0; i < 150; i++)); do     # KillWait=5, so this normally takes < 7 s
            [ -z "$(slurm_env squeue -h -o %i 2>/dev/null || true)" ] && break
            sleep 0.1
        done
    fi
fi

# Processes of jobs of *this* cluster that outlived slurmd: slurmstepd and job processes both
# carry SLURM_CONF=$CONF (and job processes SLURM_CLUSTER_NAME=clbench) in their environment.
kill_leftover_job_processes() {
    local p comm self_tree=" $$ " q=$$ victims=""
    while [ "$q" -gt 1 ] 2>/dev/null; do      # never touch ourselves or our ancestors
        q=$(awk '{print $4}' "/proc/$q/stat" 2>/dev/null) || break
        self_tree="$self_tree$q "
    done
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ "$self_tree" == *" $p "* ]] && continue
        grep -qzxF "SLURM_CONF=$CONF" "/proc/$p/environ" 2>/dev/null || continue
        comm=$(cat "/proc/$p/comm" 2>/dev/null) || continue
        case $comm in slurmd|slurmctld|slurmdbd) continue ;; esac
        if [ "$comm" = slurmstepd ] || grep -qzxF 'SLURM_CLUSTER_NAME=clbench' "/proc/$p/environ" 2>/dev/null; then
            victims="$victims $p"
        fi
    done
    if [ -n "$victims" ]; then
        log "killing leftover job processes of this cluster:$victims"
        # shellcheck disable=SC2086
        kill -KILL $victims 2>/dev/null || true
    fi
}

# 2. SIGTERM each daemon we started, newest first; SIGKILL after STOP_WAIT_S.
stop_one() {
    local name=$1 pid i
    if ! pid=$(our_pid "$name"); then
        if [ -f "$PIDS/$name.pid" ]; then
            log "$name: recorded pid $(cat "$PIDS/$name.pid" 2>/dev/null) is not running (or is not ours); skipped"
        fi
        forget_pid "$name"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_WAIT_S * 20; i++)); do
        pid_is_ours "$name" "$pid" || break
        sleep 0.05
    done
    if pid_is_ours "$name" "$pid"; then
        log "$name (pid $pid) ignored SIGTERM for $STOP_WAIT_S s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do pid_is_ours "$name" "$pid" || break; sleep 0.05; done
    fi
    log "$name (pid $pid) stopped"
    forget_pid "$name"
}
for d in slurmd slurmctld slurmdbd mariadbd munged; do
    stop_one "$d"
    if [ "$d" = slurmd ]; then kill_leftover_job_processes; fi
done

# 3. Remove the /etc/slurm symlinks we created, if they still point at our files.
if [ -f "$LINKS_FILE" ]; then
    while read -r link; do
        [ -n "$link" ] || continue
        case "$(readlink "$link" 2>/dev/null || true)" in
            "$ETC"/*) rm -f "$link"; log "removed symlink $link" ;;
        esac
    done <"$LINKS_FILE"
    rm -f "$LINKS_FILE"
fi

if [ "$PURGE" = 1 ]; then
    if [ -f "$MARKER" ]; then
        rm -rf "$BASE"
        log "purged $BASE"
    else
        echo "$PROG: ERROR: $BASE was not created by start_cluster.sh (no $MARKER); not deleting it" >&2
        exit 1
    fi
fi
log "done in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
