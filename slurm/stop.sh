#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by slurm/start.sh: cancel jobs, stop slurmd, slurmctld,
# slurmdbd, MariaDB and munged by their pid files, then wipe the state folder so the next start is
# clean. Safe to run when nothing is running. The state folder is $ICL_SCALE_SLURM_DIR, else the one
# recorded in /etc/slurm/slurm.conf by start.sh, else /tmp/icl_scale_slurm.
set -uo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

CONF_DIR=/etc/slurm
if [ -n "${ICL_SCALE_SLURM_DIR:-}" ]; then
  D="$ICL_SCALE_SLURM_DIR"
else
  D="$(sed -n 's/^# icl_scale-state-dir: //p' "$CONF_DIR/slurm.conf" 2>/dev/null | head -n1)"
  D="${D:-/tmp/icl_scale_slurm}"
fi
KEEP="${ICL_SCALE_SLURM_KEEP_STATE:-0}"

say() { echo "slurm: $*" >&2; }
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    exec sudo -n --preserve-env=ICL_SCALE_SLURM_DIR,ICL_SCALE_SLURM_KEEP_STATE bash "${BASH_SOURCE[0]}" "$@"
  fi
  say "ERROR: must run as root (sudo bash slurm/stop.sh)"; exit 1
fi
case "$D" in /|/tmp|/root|/home|/var|/etc|/usr|"") say "ERROR: refusing state folder '$D'"; exit 1 ;; esac

LOCK=/run/lock/icl_scale_slurm.lock
[ -d /run/lock ] || LOCK=/tmp/icl_scale_slurm.lock
exec 9>"$LOCK"
flock -w 300 9 || { say "ERROR: another slurm/start.sh or stop.sh holds $LOCK"; exit 1; }

if [ ! -d "$D" ]; then
  echo "slurm: not running (no state folder $D)"
  exit 0
fi

# stop_group SECONDS NAME=PIDFILE...: SIGTERM to all, wait for all, then SIGKILL what is left.
stopped=()
stop_group() {
  local secs=$1 arg name f pid i; shift
  local -a names=() pids=()
  for arg in "$@"; do
    name=${arg%%=*} f=${arg#*=}
    [ -s "$f" ] || continue
    pid="$(cat "$f" 2>/dev/null)"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || continue
    kill -TERM "$pid" 2>/dev/null
    names+=("$name") pids+=("$pid")
  done
  [ "${#pids[@]}" -gt 0 ] || return 0
  for ((i = 0; i < secs * 10; i++)); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      say "${names[$i]} (pid ${pids[$i]}) ignored SIGTERM for ${secs}s: SIGKILL"
      kill -KILL "${pids[$i]}" 2>/dev/null
    fi
  done
  stopped+=("${names[@]}")
}

# Cancel jobs first so no job steps outlive slurmd (cancelled processes die after KillWait).
if [ -s "$D/run/slurmctld.pid" ] && kill -0 "$(cat "$D/run/slurmctld.pid")" 2>/dev/null; then
  jobs_left="$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u)"
  if [ -n "$jobs_left" ]; then
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs_left 2>/dev/null
    for ((i = 0; i < 75; i++)); do
      [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

# slurmctld flushes job records to slurmdbd, which needs MariaDB; munged goes last with MariaDB.
stop_group 15 slurmd="$D/run/slurmd.pid" slurmctld="$D/run/slurmctld.pid"
stop_group 15 slurmdbd="$D/run/slurmdbd.pid"
stop_group 60 mariadbd="$D/run/mariadbd.pid" munged="$D/munge/munged.pid"

if [ "$KEEP" = 1 ]; then
  echo "slurm: stopped (${stopped[*]:-nothing was running}); state kept in $D"
  exit 0
fi
if [ -e "$D/etc/slurm.conf" ] || [ -d "$D/run" ] || [ -z "$(ls -A "$D" 2>/dev/null)" ]; then
  rm -rf "$D"
  echo "slurm: stopped (${stopped[*]:-nothing was running}); wiped $D"
else
  say "ERROR: $D does not look like a slurm/start.sh state folder; not wiping it"
  exit 1
fi
