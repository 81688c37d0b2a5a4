#!/usr/bin/env bash
# make slurm-up: a real single-node SLURM on loopback for tests, CI and trying sweeps.
#
# Starts munged, a private MariaDB (unix socket only) with slurmdbd (so that `sacct`
# works), slurmctld and slurmd; installs the Debian packages first if any is missing.
# Idempotent: daemons already running are kept, a changed configuration restarts the
# SLURM daemons. Every process it starts is recorded in $STATE/pids/, which is exactly
# what `make slurm-down` stops. Needs root (it is what slurmd runs as).
#
# Settings (environment):
#   ATTAMBA_SLURM_DIR        state, logs, database, configuration   (/tmp/attamba-slurm)
#   ATTAMBA_SLURM_PARTITION  the one (default) partition            (debug)
#   ATTAMBA_SLURM_MAXTIME    its time limit, as SLURM writes it      (1-00:00:00)
#   ATTAMBA_SLURM_CPUS       CPUs the node declares                  (nproc)
#   ATTAMBA_SLURM_GPUS       GPUs the node declares (placeholders, so --gpus-per-node is accepted) (0)
set -euo pipefail

STATE=${ATTAMBA_SLURM_DIR:-/tmp/attamba-slurm}
PARTITION=${ATTAMBA_SLURM_PARTITION:-debug}
MAXTIME=${ATTAMBA_SLURM_MAXTIME:-1-00:00:00}
CPUS=${ATTAMBA_SLURM_CPUS:-$(nproc)}
GPUS=${ATTAMBA_SLURM_GPUS:-0}
CONF_DIR=$STATE/etc
PIDS=$STATE/pids
CLIENT_CONF=/etc/slurm/slurm.conf  # where sinfo, sbatch, sacct (and submitit) look without SLURM_CONF
export SLURM_CONF=$CONF_DIR/slurm.conf
export MYSQL_UNIX_PORT=$STATE/mysql-run/mysqld.sock  # slurmdbd's client library reads it too

PACKAGES=(munge slurm-wlm slurmctld slurmd slurm-client slurmdbd slurm-wlm-mysql-plugin mariadb-server)
START=$SECONDS

log() { printf '[slurm-up %3ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf 'slurm-up: error: %s\n' "$*" >&2; exit 1; }

# running NAME PIDFILE: the pid in PIDFILE is a live process called NAME (a recycled pid is not ours)
running() {
  local pid
  pid=$(cat "$2" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

# wait_until SECONDS WHAT COMMAND...: poll COMMAND until it succeeds, or fail naming WHAT
wait_until() {
  local limit=$1 what=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${limit}s waiting for $what (logs in $STATE/log)"
    sleep 0.2
  done
}

check_settings() {
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd runs jobs as their users)"
  [[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "ATTAMBA_SLURM_CPUS: expected a positive integer, got '$CPUS'"
  [[ "$GPUS" =~ ^[0-9]+$ ]] || die "ATTAMBA_SLURM_GPUS: expected an integer >= 0, got '$GPUS'"
  [[ "$PARTITION" =~ ^[A-Za-z0-9_-]+$ ]] || die "ATTAMBA_SLURM_PARTITION: letters, digits, - and _ only, got '$PARTITION'"
  # With NoInAddrAny the daemons bind to the address the host name resolves to: it must be loopback.
  local address
  address=$(getent ahostsv4 "$(hostname)" | awk 'NR == 1 {print $1}')
  case "$address" in
    127.*) ;;
    *) die "host name '$(hostname)' resolves to '${address:-nothing}', not a 127.x address: the daemons would not be loopback-only" ;;
  esac
}

install_packages() {
  local missing=() package
  for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  log "installing ${missing[*]}"
  # Package scripts must not start the system's own daemons: we start ours, with our configuration.
  local policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy_added=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$policy_added" = 0 ] || rm -f /usr/sbin/policy-rc.d
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --force --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
}

slurm_conf() {
  local memory_mb gres_types="" node_gres=""
  memory_mb=$(($(free -m | awk '/^Mem:/ {print $2}') * 9 / 10))
  if [ "$GPUS" -gt 0 ]; then
    gres_types="GresTypes=gpu"
    node_gres="Gres=gpu:$GPUS"
  fi
  cat <<EOF
# Written by launchers/slurm-up.sh: one node, loopback only. Edits are overwritten.
ClusterName=attamba
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs become eligible once the old job credential expires: 5 s, not 2 min.
AuthInfo=cred_expire=5
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmctldPort=6817
SlurmdPort=6818
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule every 2 s, so that queued and requeued jobs start within seconds.
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
KillWait=5
SlurmdParameters=config_overrides
$gres_types
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$memory_mb $node_gres State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=$MAXTIME State=UP
EOF
}

slurmdbd_conf() {
  cat <<EOF
# Written by launchers/slurm-up.sh. Edits are overwritten.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
CommunicationParameters=NoInAddrAny
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
}

gres_conf() {
  # slurmd ignores GPUs without device files: point each at a placeholder file.
  [ "$GPUS" -gt 0 ] && echo "Name=gpu File=$STATE/gpu[0-$((GPUS - 1))]"
  return 0
}

# write_if_changed FILE CONTENT: returns 0 when FILE was (re)written
write_if_changed() {
  [ "$(cat "$1" 2>/dev/null)" != "$2" ] || return 1
  printf '%s\n' "$2" >"$1"
}

write_configuration() {
  mkdir -p "$PIDS" "$CONF_DIR" "$STATE/log" "$STATE/run" "$STATE/spool/slurmctld" "$STATE/spool/slurmd"
  local changed=0 index
  write_if_changed "$CONF_DIR/slurm.conf" "$(slurm_conf)" && changed=1
  write_if_changed "$CONF_DIR/slurmdbd.conf" "$(slurmdbd_conf)" && changed=1
  write_if_changed "$CONF_DIR/gres.conf" "$(gres_conf)" && changed=1
  chmod 600 "$CONF_DIR/slurmdbd.conf"
  for ((index = 0; index < GPUS; index++)); do touch "$STATE/gpu$index"; done
  # Client commands find the cluster through /etc/slurm/slurm.conf; never replace someone else's.
  mkdir -p /etc/slurm
  if [ -e "$CLIENT_CONF" ] && [ "$(readlink "$CLIENT_CONF")" != "$CONF_DIR/slurm.conf" ]; then
    die "$CLIENT_CONF exists and is not ours (a link to $CONF_DIR/slurm.conf); move it away first"
  fi
  ln -sfn "$CONF_DIR/slurm.conf" "$CLIENT_CONF"
  if [ "$changed" = 1 ]; then
    restart_slurm_daemons
  fi
}

restart_slurm_daemons() {
  local name
  for name in slurmd slurmctld slurmdbd; do
    if running "$name" "$PIDS/$name.pid"; then
      log "configuration changed: restarting $name"
      kill -TERM "$(cat "$PIDS/$name.pid")"
      wait_until 30 "$name to stop" bash -c "$(declare -f running); ! running $name $PIDS/$name.pid"
    fi
  done
}

start_munged() {
  running munged "$PIDS/munged.pid" && return 0
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged is already running (not started here, so slurm-down leaves it alone)"
    return 0
  fi
  install -d -o munge -g munge -m 755 /run/munge
  runuser -u munge -- /usr/sbin/munged  # daemonizes, writes /run/munge/munged.pid
  wait_until 10 munged bash -c 'munge -n | unmunge'
  cp /run/munge/munged.pid "$PIDS/munged.pid"
  log "munged started (pid $(cat "$PIDS/munged.pid"))"
}

start_mariadb() {
  running mariadbd "$PIDS/mariadbd.pid" && return 0
  local data=$STATE/mysql run=$STATE/mysql-run
  install -d -o mysql -g mysql "$data" "$run"
  if [ ! -d "$data/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$data" --user=mysql --skip-test-db \
      --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1
  fi
  rm -f "$run/mariadbd.pid"
  # No TCP at all: slurmdbd reaches it through the unix socket in MYSQL_UNIX_PORT.
  setsid /usr/sbin/mariadbd --no-defaults --datadir="$data" --user=mysql --skip-networking \
    --socket="$MYSQL_UNIX_PORT" --pid-file="$run/mariadbd.pid" --log-error="$STATE/log/mariadbd.log" \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
  wait_until 60 mariadbd mariadb --no-defaults -uroot -S "$MYSQL_UNIX_PORT" -e 'select 1'
  cp "$run/mariadbd.pid" "$PIDS/mariadbd.pid"
  log "mariadbd started (pid $(cat "$PIDS/mariadbd.pid"))"
}

# start_daemon NAME: start a forking SLURM daemon whose pid file is $STATE/run/NAME.pid
start_daemon() {
  local name=$1
  running "$name" "$PIDS/$name.pid" && return 0
  rm -f "$STATE/run/$name.pid"
  "/usr/sbin/$name"
  wait_until 30 "$name" test -s "$STATE/run/$name.pid"
  cp "$STATE/run/$name.pid" "$PIDS/$name.pid"
  log "$name started (pid $(cat "$PIDS/$name.pid"))"
}

wait_for_node() {
  local deadline=$((SECONDS + 60)) resumed=0 state
  while :; do
    state=$(sinfo --noheader --nodes=localhost --format=%T 2>/dev/null || true)
    case "$state" in
      idle | mixed | allocated | completing) return 0 ;;
      *drain*)  # a node drained by an earlier run stays drained across restarts
        if [ "$resumed" = 0 ]; then
          log "resuming drained node: $(sinfo --noheader --nodes=localhost --format='%E')"
          scontrol update nodename=localhost state=resume || true
          resumed=1
        fi ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || die "node not ready after 60s: $(sinfo --noheader --nodes=localhost --format='%T %E' 2>&1)"
    sleep 0.2
  done
}

# Every socket our daemons listen on must be loopback (or a unix socket).
check_loopback_only() {
  local name pid exposed
  for name in slurmctld slurmd slurmdbd; do
    pid=$(cat "$PIDS/$name.pid")
    exposed=$(ss -Hltnp | grep "pid=$pid," | awk '{print $4}' | grep -v '^127\.' || true)
    [ -z "$exposed" ] || die "$name listens on $exposed, not loopback only"
  done
}

main() {
  check_settings
  install_packages
  write_configuration
  start_munged
  start_mariadb
  start_daemon slurmdbd
  wait_until 30 "slurmdbd on 127.0.0.1:6819" bash -c 'ss -Hltn | grep -q "127.0.0.1:6819 "'
  start_daemon slurmctld
  start_daemon slurmd
  wait_for_node
  wait_until 60 "the cluster to register with slurmdbd" \
    bash -c 'sacctmgr --noheader --parsable2 list cluster format=cluster | grep -qx attamba'
  check_loopback_only
  log "ready: $(sinfo --noheader --format='partition %P, %D node %T, %c CPUs, %m MB, gres %G')"
}

main "$@"
