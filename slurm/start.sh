#!/usr/bin/env bash
# Start a single-node Slurm 22.05 cluster WITH accounting on this machine, as root, without systemd:
#   munged (as the munge user) -> MariaDB (--skip-networking) -> slurmdbd -> slurmctld -> slurmd.
# Idempotent: installs the Debian packages only when missing, starts only daemons that are not running,
# and exits 0 at once when the cluster is already up. All state, spool, log, pid and socket files live
# under one folder ($ICL_SCALE_SLURM_DIR, default /tmp/icl_scale_slurm); slurm/stop.sh stops the
# daemons by their pid files and wipes that folder. See slurm/README.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

D="${ICL_SCALE_SLURM_DIR:-/tmp/icl_scale_slurm}"
CLUSTER="${ICL_SCALE_SLURM_CLUSTER:-icl_scale}"
PARTITION=debug
CTLD_PORT="${ICL_SCALE_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${ICL_SCALE_SLURM_SLURMD_PORT:-6818}"
DBD_PORT="${ICL_SCALE_SLURM_DBD_PORT:-6819}"
KILL_WAIT="${ICL_SCALE_SLURM_KILL_WAIT:-2}"
TIMEOUT="${ICL_SCALE_SLURM_TIMEOUT:-90}"
CONF_DIR=/etc/slurm            # Debian's compiled-in default: every client finds slurm.conf there.
ACCOUNT=icl_scale
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
BINARIES=(slurmctld slurmd sbatch squeue sinfo sacct sacctmgr scontrol munge unmunge munged mungekey
          slurmdbd mariadbd mariadb-install-db mariadb-admin)

MUNGE_SOCK="$D/munge/munge.socket.2"
MYSQL_SOCK="$D/mysql/mysqld.sock"
T0=$(date +%s.%N)

say() { echo "slurm: $*" >&2; }
die() { echo "slurm: ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }'; }

# show_log FILE: last lines of a daemon log, for error messages.
show_log() { [ -f "$1" ] && { echo "---- tail $1" >&2; tail -n 20 "$1" >&2; } || true; }

# wait_for SECONDS WHAT CMD...: poll CMD until it succeeds.
wait_for() {
  local secs=$1 what=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.3
  done
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

if [ "$(id -u)" != 0 ]; then
  # Re-run through passwordless sudo when there is one (CI images often run as a sudoer).
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    exec sudo -n --preserve-env=ICL_SCALE_SLURM_DIR,ICL_SCALE_SLURM_CLUSTER,ICL_SCALE_SLURM_CTLD_PORT,ICL_SCALE_SLURM_SLURMD_PORT,ICL_SCALE_SLURM_DBD_PORT,ICL_SCALE_SLURM_KILL_WAIT,ICL_SCALE_SLURM_TIMEOUT bash "${BASH_SOURCE[0]}" "$@"
  fi
  die "must run as root (sudo bash slurm/start.sh)"
fi

# One start/stop at a time (the lock lives outside the state folder, which stop.sh wipes).
LOCK=/run/lock/icl_scale_slurm.lock
[ -d /run/lock ] || LOCK=/tmp/icl_scale_slurm.lock
exec 9>"$LOCK"
flock -w 300 9 || die "another slurm/start.sh or stop.sh holds $LOCK"

# ---------------------------------------------------------------- health checks
munge_ok() { munge -S "$MUNGE_SOCK" -n 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; }
db_ok() { mariadb-admin --no-defaults --socket="$MYSQL_SOCK" -uroot ping >/dev/null 2>&1; }
dbd_ok() { timeout 10 sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
ctld_ok() { timeout 10 scontrol ping 2>/dev/null | grep -q "is UP"; }
node_state() { timeout 10 sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -n1; }
node_ok() { case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac; }
sacct_ok() { timeout 10 sacct -n -X -S now-1hours -o JobID >/dev/null 2>&1; }
conf_is_ours() { grep -qs "icl_scale-state-dir: $D\$" "$CONF_DIR/slurm.conf"; }
cpus() { timeout 10 sinfo -h -p "$PARTITION" -o %C 2>/dev/null | awk -F/ '{ print $4 }'; }

have_binaries() { local b; for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null || return 1; done; }

daemons_alive() {
  local f
  for f in "$D/munge/munged.pid" "$D/run/mariadbd.pid" "$D/run/slurmdbd.pid" "$D/run/slurmctld.pid" \
           "$D/run/slurmd.pid"; do
    pid_alive "$f" || return 1
  done
}

if have_binaries && conf_is_ours && daemons_alive && ctld_ok && node_ok && sacct_ok; then
  echo "slurm: already up (partition $PARTITION, $(cpus) cpus, state $D); stop with slurm/stop.sh"
  exit 0
fi

# ---------------------------------------------------------------- install (only what is missing)
if ! have_binaries; then
  say "installing ${PACKAGES[*]} (apt-get) ..."
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages' init scripts from starting system-wide daemons (ports 6817-6819, 3306).
  POLICY=/usr/sbin/policy-rc.d
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"; chmod 755 "$POLICY"
    trap 'rm -f "$POLICY"' EXIT
  fi
  apt_install() { apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"/tmp/icl_scale_slurm_apt.log" 2>&1; }
  if ! apt_install; then
    apt-get update -q >/dev/null 2>&1 || true
    apt_install || { tail -n 20 /tmp/icl_scale_slurm_apt.log >&2; die "apt-get install ${PACKAGES[*]} failed"; }
  fi
  have_binaries || die "packages installed but some of ${BINARIES[*]} are still missing"
  say "installed in $(elapsed) s"
fi

# ---------------------------------------------------------------- configuration
mkdir -p "$D"/{run,log,etc,slurmctld,slurmd,munge,mysql}
chmod 755 "$D" "$D/munge"
chown munge:munge "$D/munge"

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 600 /etc/munge/munge.key

HOST="$(hostname -s)"
NODE_LINE="$(slurmd -C 2>/dev/null | grep '^NodeName=' | head -n1)"
[ -n "$NODE_LINE" ] || die "slurmd -C printed no NodeName line"

render() {  # render TEMPLATE OUT
  sed -e "s|@STATE_DIR@|$D|g" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$HOST|g" \
      -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
      -e "s|@KILL_WAIT@|$KILL_WAIT|g" -e "s|@PARTITION@|$PARTITION|g" -e "s|@NODE_LINE@|$NODE_LINE|g" \
      "$1" >"$2"
}
render "$HERE/slurm.conf.template" "$D/etc/slurm.conf"
render "$HERE/slurmdbd.conf.template" "$D/etc/slurmdbd.conf"

mkdir -p "$CONF_DIR"
for f in slurm.conf slurmdbd.conf; do
  # Keep a copy of a configuration that this script did not write.
  if [ -f "$CONF_DIR/$f" ] && ! grep -qs "Managed by icl_scale" "$CONF_DIR/$f" \
     && [ ! -e "$CONF_DIR/$f.before-icl_scale" ]; then
    cp -p "$CONF_DIR/$f" "$CONF_DIR/$f.before-icl_scale"
    say "kept the previous $CONF_DIR/$f as $f.before-icl_scale"
  fi
done
install -m 644 "$D/etc/slurm.conf" "$CONF_DIR/slurm.conf"
install -m 600 "$D/etc/slurmdbd.conf" "$CONF_DIR/slurmdbd.conf"   # slurmdbd insists on 600, SlurmUser-owned

# ---------------------------------------------------------------- munged (refuses root: run as munge)
if ! munge_ok; then
  pid_alive "$D/munge/munged.pid" && kill "$(cat "$D/munge/munged.pid")" 2>/dev/null || true
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  runuser -u munge -- munged 9>&- --socket="$MUNGE_SOCK" --key-file=/etc/munge/munge.key \
    --pid-file="$D/munge/munged.pid" --log-file="$D/munge/munged.log" --seed-file="$D/munge/munged.seed" \
    || { show_log "$D/munge/munged.log"; die "munged failed to start"; }
  wait_for 15 munge munge_ok || { show_log "$D/munge/munged.log"; die "munged does not answer on $MUNGE_SOCK"; }
fi

# ---------------------------------------------------------------- MariaDB (private datadir, socket only)
if ! db_ok; then
  if [ ! -d "$D/mysql/data/mysql" ]; then
    rm -rf "$D/mysql/data"
    mariadb-install-db --no-defaults --user=root --datadir="$D/mysql/data" --skip-test-db \
      --auth-root-authentication-method=socket >"$D/log/mariadb-install.log" 2>&1 \
      || { show_log "$D/log/mariadb-install.log"; die "mariadb-install-db failed"; }
  fi
  setsid mariadbd 9>&- --no-defaults --user=root --datadir="$D/mysql/data" --socket="$MYSQL_SOCK" \
    --pid-file="$D/run/mariadbd.pid" --log-error="$D/log/mariadb.log" --skip-networking \
    --skip-name-resolve --innodb-buffer-pool-size=256M --innodb-log-file-size=64M \
    --innodb-lock-wait-timeout=900 --max-allowed-packet=64M </dev/null >/dev/null 2>&1 &
  wait_for 60 mariadb db_ok || { show_log "$D/log/mariadb.log"; die "MariaDB did not start"; }
fi

# ---------------------------------------------------------------- slurmdbd + cluster/account registration
if ! pid_alive "$D/run/slurmdbd.pid" || ! dbd_ok; then
  pid_alive "$D/run/slurmdbd.pid" || MYSQL_UNIX_PORT="$MYSQL_SOCK" slurmdbd 9>&- \
    || { show_log "$D/log/slurmdbd.log"; die "slurmdbd failed to start"; }
  wait_for 60 slurmdbd dbd_ok || { show_log "$D/log/slurmdbd.log"; die "slurmdbd does not answer (sacctmgr)"; }
fi
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
fi
if ! sacctmgr -n -P list account "$ACCOUNT" format=account 2>/dev/null | grep -qx "$ACCOUNT"; then
  sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="icl_scale dev cluster" \
    Organization=icl_scale >/dev/null || die "sacctmgr add account failed"
fi
if ! sacctmgr -n -P list assoc user=root account="$ACCOUNT" format=user 2>/dev/null | grep -qx root; then
  sacctmgr -i add user root Account="$ACCOUNT" DefaultAccount="$ACCOUNT" Cluster="$CLUSTER" >/dev/null \
    || die "sacctmgr add user root failed"
fi

# ---------------------------------------------------------------- slurmctld, slurmd
if ! pid_alive "$D/run/slurmctld.pid"; then
  slurmctld 9>&- || { show_log "$D/log/slurmctld.log"; die "slurmctld failed to start"; }
fi
wait_for 60 slurmctld ctld_ok || { show_log "$D/log/slurmctld.log"; die "slurmctld does not answer (scontrol ping)"; }

if ! pid_alive "$D/run/slurmd.pid"; then
  slurmd 9>&- || { show_log "$D/log/slurmd.log"; die "slurmd failed to start"; }
fi

left=$(( TIMEOUT - $(elapsed) )); [ "$left" -gt 10 ] || left=10
if ! wait_for "$left" node node_ok; then
  # A node left DOWN/DRAINED by an earlier crash: ReturnToService=2 covers most cases, resume the rest.
  scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
  wait_for 15 node node_ok || { show_log "$D/log/slurmd.log"; show_log "$D/log/slurmctld.log";
    die "node $HOST is '$(node_state)', not idle (see $D/log)"; }
fi
wait_for 30 sacct sacct_ok || { show_log "$D/log/slurmdbd.log"; die "sacct does not work"; }

echo "slurm: up (partition $PARTITION, $(cpus) cpus, state $D, $(elapsed) s); stop with slurm/stop.sh"
