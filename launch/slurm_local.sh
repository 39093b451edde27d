#!/usr/bin/env bash
# A private two-node SLURM cluster on this machine, for trying and testing slurm/*.sbatch:
# one slurmctld and two slurmd (nodes n1 at 127.0.0.2 and n2 at 127.0.0.3, so Ray sees two
# hosts), with its own munged. Everything lives in one folder (config, keys, spool, state, logs);
# nothing in /etc is touched. Installs Debian's slurm-wlm and munge first if missing (root).
#
#   bash launch/slurm_local.sh up|down|status
#   eval "$(bash launch/slurm_local.sh env)"     # SLURM_CONF for sbatch/squeue/sacct in this shell
#
#   LIQE_SLURM_DIR   the folder (default /tmp/liqe-slurm; short: slurmd's socket paths live there)
#   LIQE_SLURM_CPUS  CPUs each node advertises (default 2; both nodes share this machine's cores)
#   LIQE_SLURM_GPUS  GPUs each node advertises (default 2; counted, not real: for the GPU mapping)
#   LIQE_SLURM_PORT  slurmctld's port (default 16817; the nodes use the next two)
set -euo pipefail
dir="${LIQE_SLURM_DIR:-/tmp/liqe-slurm}"
cpus="${LIQE_SLURM_CPUS:-2}"
gpus="${LIQE_SLURM_GPUS:-2}"
port="${LIQE_SLURM_PORT:-16817}"
nodes=(n1 n2)
addrs=(127.0.0.2 127.0.0.3)
export SLURM_CONF="$dir/slurm.conf"

log() { echo "[slurm-local] $*" >&2; }

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [[ $(id -u) == 0 ]] || { log "slurm-wlm and munge are not installed and this is not root: apt-get install slurm-wlm munge"; exit 1; }
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
  mkdir -p "$dir"/{log,run,state,munge} "$dir"/spool/{n1,n2}
  chmod 700 "$dir/munge"
  [[ -s "$dir/munge/munge.key" ]] || { dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none; chmod 400 "$dir/munge/munge.key"; }
  local mem_mb; mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / ${#nodes[@]} ))
  cat > "$SLURM_CONF" <<EOF
# Written by launch/slurm_local.sh: a two-node cluster on one machine.
ClusterName=liqe-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$port
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
# Both nodes are this machine: no cgroups, processes tracked by parentage; the configured CPUs
# are taken as given, not checked against the hardware.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
# Requeued jobs go back to pending at once (the default holds them for 60 s).
SchedulerParameters=nohold_on_prolog_fail
MinJobAge=600
KillWait=10
InactiveLimit=0
EOF
  # Each node advertises GPUs that do not exist (stand-in device files): SLURM hands them out and
  # sets SLURM_GPUS_ON_NODE, which is what the scripts read; nothing can run on them.
  echo "GresTypes=gpu" >> "$SLURM_CONF"
  : > "$dir/gres.conf"
  for n in "${nodes[@]}"; do
    for g in $(seq 0 $((gpus - 1))); do
      # a character device as slurmd expects (/dev/null's numbers); a plain file works too, with
      # an error line in the slurmd log, where mknod is not allowed
      [[ -e "$dir/gpu-$n-$g" ]] || mknod "$dir/gpu-$n-$g" c 1 3 2>/dev/null || touch "$dir/gpu-$n-$g"
      echo "NodeName=$n Name=gpu File=$dir/gpu-$n-$g" >> "$dir/gres.conf"
    done
  done
  for i in "${!nodes[@]}"; do
    echo "NodeName=${nodes[$i]} NodeAddr=${addrs[$i]} NodeHostname=${nodes[$i]} Port=$((port + 1 + i)) CPUs=$cpus Gres=gpu:$gpus RealMemory=$mem_mb State=UNKNOWN" >> "$SLURM_CONF"
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP" >> "$SLURM_CONF"
}

up() {
  install
  write_config
  if ! pid_alive "$dir/run/munged.pid"; then
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
      --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
  fi
  pid_alive "$dir/run/slurmctld.pid" || slurmctld
  for n in "${nodes[@]}"; do pid_alive "$dir/run/slurmd-$n.pid" || slurmd -N "$n"; done
  for _ in $(seq 60); do
    if [[ $(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)') == "${#nodes[@]}" ]]; then
      log "up: ${#nodes[*]} nodes (${nodes[*]} at ${addrs[*]}), $cpus CPUs each; SLURM_CONF=$SLURM_CONF"
      return
    fi
    sleep 1
  done
  log "the nodes did not come up; logs in $dir/log"; sinfo -N >&2 || true; exit 1
}

down() {
  if [[ -f "$SLURM_CONF" ]] && command -v scancel >/dev/null; then
    scancel --full --quiet "--user=$(id -un)" 2>/dev/null || true
  fi
  for f in "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid" "$dir/run/munged.pid"; do
    [[ -f "$f" ]] || continue
    local pid; pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
  log "down"
}

status() {
  for f in "$dir"/run/*.pid; do
    [[ -f "$f" ]] || continue
    if pid_alive "$f"; then echo "$(basename "$f" .pid) running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid) dead"; fi
  done
  if [[ ! -f "$SLURM_CONF" ]]; then echo "no cluster configured in $dir"
  elif ! sinfo -N 2>/dev/null; then echo "configured in $dir, not running (bash $0 up)"; fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
