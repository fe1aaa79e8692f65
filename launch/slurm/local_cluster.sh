#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on this machine: munged + slurmctld + slurmd, one partition
# `debug`, no accounting (no slurmdbd, so no sacct). It is for CI (.ci/run) and for the pytest
# fixture in tests/orchestration/slurm_cluster.py, and for trying the sbatch templates in launch/
# (job arrays, --dependency) on one machine. It is NOT a way to set up a production cluster: it
# runs every daemon as root, overwrites /etc/slurm/slurm.conf, and wipes the controller's job state
# on each `up`.
#
# Needs root and Debian/Ubuntu (installs slurm-wlm + munge with apt-get when they are missing).
# Works without systemd: the daemons are started directly and stopped by their pid files.
#
#   launch/slurm/local_cluster.sh up       # install if needed, write config, start, wait until idle
#   launch/slurm/local_cluster.sh status   # exit 0 and print sinfo when the cluster answers, else 1
#   launch/slurm/local_cluster.sh down     # cancel jobs, stop slurmd, slurmctld, munged
#
# Environment: CONNITO_SLURM_UP_TIMEOUT (seconds `up` waits for the node to become idle, default 60),
# CONNITO_SLURM_MIN_JOB_AGE (seconds finished jobs stay visible to scontrol/squeue, default 3600).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# written by connito launch/slurm/local_cluster.sh"
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
MUNGE_KEY=/etc/munge/munge.key
UP_TIMEOUT=${CONNITO_SLURM_UP_TIMEOUT:-60}
MIN_JOB_AGE=${CONNITO_SLURM_MIN_JOB_AGE:-3600}

say() { echo "slurm: $*"; }
die() { echo "slurm: error: $*" >&2; exit 1; }

usage() {
  awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
  exit "${1:-0}"
}

# Node state as sinfo reports it ("idle", "mixed", ...), empty when the controller does not answer.
node_state() { timeout 10 sinfo -h -o %T 2>/dev/null | head -n 1 || true; }

cluster_ready() {
  case "$(node_state)" in
    idle* | mix* | alloc* | completing*) return 0 ;;
    *) return 1 ;;
  esac
}

# Pid from a pid file when that process is alive and runs the expected program.
live_pid() {
  local file=$1 name=$2 pid
  [[ -r $file ]] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] || return 1
  echo "$pid"
}

install_if_missing() {
  if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v munged >/dev/null; then
    return 0
  fi
  if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
    die "slurm-wlm/munge are not installed; this script installs them only as root on Debian/Ubuntu (apt-get install slurm-wlm munge)"
  fi
  say "installing slurm-wlm munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq slurm-wlm munge >/dev/null
  command -v slurmctld >/dev/null || die "apt-get install slurm-wlm munge did not provide slurmctld"
}

start_munge() {
  if timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
    return 0  # a munged already answers
  fi
  if [[ ! -s $MUNGE_KEY ]]; then
    mkdir -p "$(dirname "$MUNGE_KEY")"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$MUNGE_KEY" --force
    else
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
  fi
  chown munge:munge "$(dirname "$MUNGE_KEY")" "$MUNGE_KEY"
  chmod 700 "$(dirname "$MUNGE_KEY")"
  chmod 400 "$MUNGE_KEY"
  install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
  install -d -o munge -g munge -m 0700 /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  rm -f "$MUNGE_PID"
  runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" \
    || die "munged did not start (see /var/log/munge/munged.log)"
  local i
  for i in $(seq 50); do
    timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
}

write_config() {
  local node=$1 cpus=$2 mem_mb=$3
  mkdir -p "$CONF_DIR"
  if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    cp -p "$CONF" "$CONF.bak-connito"
    say "kept the previous $CONF as $CONF.bak-connito"
  fi
  cat >"$CONF" <<EOF
$MARKER
# Single-node test cluster for CI; not a production configuration.
ClusterName=connito
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
# CPUs only: memory is not a consumable resource, so jobs without --mem do not each take the node.
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
# Finished jobs stay visible to scontrol show job / squeue -t all this long (no sacct here);
# slurmctld purges them in a pass about once a minute after that.
MinJobAge=$MIN_JOB_AGE
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

cmd_up() {
  [[ $EUID -eq 0 ]] || die "run as root (starts munged, slurmctld and slurmd)"
  local t0=${EPOCHREALTIME/,/.} node cpus mem_kb mem_mb state
  node=$(hostname -s)
  # Pid files first: sinfo against a stopped controller retries for ~9 s before it gives up.
  if live_pid "$CTLD_PID" slurmctld >/dev/null && live_pid "$SLURMD_PID" slurmd >/dev/null \
    && command -v sinfo >/dev/null && [[ -f $CONF ]] && cluster_ready; then
    say "already up (node $node, $(timeout 10 sinfo -h -o %c | head -n 1) cpus, $(node_state))"
    return 0
  fi
  install_if_missing
  cpus=$(nproc)
  mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  mem_mb=$((mem_kb / 1024))
  mem_mb=$((mem_mb - mem_mb / 20 - 256))  # 5% + 256 MB below MemTotal: slurmd drains a node that reports less
  ((mem_mb > 256)) || mem_mb=256

  # Whatever half-started state there is goes first (stale pid files, a controller without slurmd).
  stop_slurm_daemons
  start_munge
  write_config "$node" "$cpus" "$mem_mb"
  install -d -m 0755 "$CTLD_STATE" "$SLURMD_SPOOL" "$LOG_DIR"

  # -c: start with no saved jobs, so every `up` is a fresh cluster.
  /usr/sbin/slurmctld -c || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
  /usr/sbin/slurmd -N "$node" || die "slurmd did not start (see $LOG_DIR/slurmd.log)"

  local deadline=$((SECONDS + UP_TIMEOUT))
  while ((SECONDS < deadline)); do
    state=$(node_state)
    case "$state" in
      idle*) break ;;
      drain* | down*)
        timeout 10 scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  if [[ "$(node_state)" != idle* ]]; then
    echo "--- tail $LOG_DIR/slurmctld.log" >&2; tail -n 20 "$LOG_DIR/slurmctld.log" >&2 || true
    echo "--- tail $LOG_DIR/slurmd.log" >&2; tail -n 20 "$LOG_DIR/slurmd.log" >&2 || true
    die "node $node not idle after ${UP_TIMEOUT}s (state: '${state:-no answer}')"
  fi
  say "up (node $node, $cpus cpus) in $(awk -v a="$t0" -v b="${EPOCHREALTIME/,/.}" 'BEGIN {printf "%.1f", b - a}')s"
}

# SIGTERM, wait up to 10 s, then SIGKILL; removes the pid file.
stop_by_pidfile() {
  local file=$1 name=$2 pid i
  if pid=$(live_pid "$file" "$name"); then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      say "$name ($pid) did not stop on SIGTERM; killed"
    fi
  fi
  rm -f "$file"
}

stop_slurm_daemons() {
  stop_by_pidfile "$SLURMD_PID" slurmd
  stop_by_pidfile "$CTLD_PID" slurmctld
}

cmd_down() {
  local jobs
  # Cancel what is queued or running so no slurmstepd/job processes outlive slurmd.
  if live_pid "$CTLD_PID" slurmctld >/dev/null && command -v squeue >/dev/null; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [[ -n ${jobs// /} ]]; then
      # shellcheck disable=SC2086
      timeout 10 scancel $jobs >/dev/null 2>&1 || true
      sleep 1
    fi
  fi
  stop_slurm_daemons
  stop_by_pidfile "$MUNGE_PID" munged
  say "down"
}

cmd_status() {
  command -v sinfo >/dev/null || { echo "slurm: not installed"; return 1; }
  local out
  if out=$(timeout 10 sinfo 2>&1); then
    echo "$out"
    return 0
  fi
  echo "slurm: not answering: $out"
  return 1
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  -h | --help | help) usage 0 ;;
  *) usage 2 >&2 ;;
esac
