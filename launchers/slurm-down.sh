#!/usr/bin/env bash
# make slurm-down: stop exactly the daemons launchers/slurm-up.sh started (the pids it
# recorded in $ATTAMBA_SLURM_DIR/pids/), in reverse start order. Jobs still queued or
# running are cancelled first: stopping slurmd would leave their processes behind.
# State, logs and the accounting database stay (rm -rf the directory to wipe them).
# Idempotent: with nothing running it says so and succeeds.
set -uo pipefail

STATE=${ATTAMBA_SLURM_DIR:-/tmp/attamba-slurm}
PIDS=$STATE/pids
CLIENT_CONF=/etc/slurm/slurm.conf

alive() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

# ours NAME: the pid recorded for NAME, if that process is still NAME and alive
ours() {
  local pid
  pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
  alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
}

cancel_jobs() {
  ours slurmctld >/dev/null || return 0
  local jobs
  jobs=$(squeue --noheader --format=%A 2>/dev/null | sort -u)
  [ -n "$jobs" ] || return 0
  echo "slurm-down: cancelling jobs $(echo $jobs)"
  # shellcheck disable=SC2086  # one argument per job id
  scancel --full $jobs 2>/dev/null || true
  for _ in $(seq 150); do
    [ -z "$(squeue --noheader --format=%A 2>/dev/null)" ] && return 0
    sleep 0.2
  done
  echo "slurm-down: jobs still listed after 30s: $(squeue --noheader --format='%A %T' | tr '\n' ' ')"
}

stop() {
  local name=$1 pid
  if ! pid=$(ours "$name"); then
    [ -e "$PIDS/$name.pid" ] && echo "slurm-down: $name was not running (stale record)"
    rm -f "$PIDS/$name.pid"
    return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 150); do alive "$pid" || break; sleep 0.2; done
  if alive "$pid"; then
    echo "slurm-down: $name (pid $pid) still running 30s after SIGTERM: SIGKILL"
    kill -KILL "$pid"
  fi
  echo "slurm-down: stopped $name (pid $pid)"
  rm -f "$PIDS/$name.pid"
}

main() {
  if [ -z "$(ls -A "$PIDS" 2>/dev/null)" ]; then
    echo "slurm-down: nothing to stop (no daemon recorded in $PIDS)"
    return 0
  fi
  cancel_jobs
  local name
  for name in slurmd slurmctld slurmdbd mariadbd munged; do stop "$name"; done
  # Without the daemons the client link only produces connection errors: remove it if it is ours.
  if [ "$(readlink "$CLIENT_CONF" 2>/dev/null)" = "$STATE/etc/slurm.conf" ]; then rm -f "$CLIENT_CONF"; fi
}

main "$@"
