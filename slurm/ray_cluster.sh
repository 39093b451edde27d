# Sourced by the slurm/*.sbatch scripts: a Ray cluster across this job's nodes, stopped when the
# job's script exits. The head runs on the job's first node (where the script runs), one worker
# per other node via srun; addresses are the nodes' NodeAddr as SLURM knows them. Exports
# LIQE_RAY_ADDRESS (head:port) and Ray's token settings for the `liqe-dist ... --address` command.
#
#   LIQE_SLURM_STATE   shared folder for per-job files: JOBID/ray-NODE.log (each node's `ray start`)
#                      and the job's token while it runs (default: ~/.liqe-dist/slurm-jobs)
#   LIQE_RAY_WAIT      seconds to wait for every node to join (default 180)
mapfile -t LIQE_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
node_addr() { scontrol show node "$1" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p'; }
head_addr="$(node_addr "${LIQE_NODES[0]}")"

# Ports: the head's from the job id (two jobs sharing a node get different blocks of 100, below
# the kernel's ephemeral range), each node's fixed-default one offset by its index (nodes may share
# a machine), every other port (workers, object manager, agents) picked free by the OS. Ray's temp
# dir is per job and short (its socket paths must stay under 107 bytes).
port_base=$(( 10000 + (SLURM_JOB_ID % 220) * 100 ))
LIQE_RAY_ADDRESS="$head_addr:$port_base"
ray_tmp="/tmp/ray-$SLURM_JOB_ID"

# Resources per node from SLURM: its CPUs, its GPUs (one Ray Train worker per GPU), and an object
# store below the node's /dev/shm.
ray_cpus="${SLURM_CPUS_ON_NODE:?}"
ray_gpus="${SLURM_GPUS_ON_NODE:-0}"
shm_bytes=$(df -B1 --output=size /dev/shm | tail -1)
mem_bytes=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 1024 ))
ray_store=$(( shm_bytes / 2 < mem_bytes / 4 ? shm_bytes / 2 : mem_bytes / 4 ))

# Token authentication with a fresh token per job, readable by its owner only.
ray_state="${LIQE_SLURM_STATE:-$HOME/.liqe-dist/slurm-jobs}/$SLURM_JOB_ID"
mkdir -p "$ray_state" && chmod 700 "$ray_state"
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$ray_state/token")
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$ray_state/token" LIQE_RAY_ADDRESS

ray_pids=()
ray_cluster_stop() {
  # Only this job's Ray: its `ray start --block` processes stop their node's Ray on SIGTERM (the
  # head's directly, the other nodes' through their job steps), then anything still running from
  # this job's temp dir; after 15 s, SIGKILL (what is left on other nodes ends with the job).
  # Never `ray stop`: it would stop other users' clusters on a shared node.
  local pid
  (( ${#ray_pids[@]} )) || return 0
  slurm_log "stopping this job's Ray"
  scancel --quiet --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true  # every step, not the batch script
  kill -TERM "${ray_pids[0]}" 2>/dev/null || true
  for _ in $(seq 15); do
    for pid in "${ray_pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; pid=; done
    [[ -z "$pid" ]] && break
    sleep 1
  done
  kill -KILL "${ray_pids[@]}" 2>/dev/null || true  # (scancel --signal=KILL would cancel the job)
  pkill -KILL -f -- "$ray_tmp/" 2>/dev/null || true
  wait "${ray_pids[@]}" 2>/dev/null || true
  rm -f "$ray_state/token"
  ray_pids=()
}
trap ray_cluster_stop EXIT

slurm_log "Ray head on ${LIQE_NODES[0]} ($LIQE_RAY_ADDRESS), ${#LIQE_NODES[@]} node(s), $ray_cpus CPUs and $ray_gpus GPUs per node"
common=(--block --temp-dir="$ray_tmp" --num-cpus="$ray_cpus" --num-gpus="$ray_gpus" --object-store-memory="$ray_store"
  --min-worker-port=0 --max-worker-port=0 --disable-usage-stats)
ray start --head --node-ip-address="$head_addr" --port="$port_base" --ray-client-server-port=$((port_base + 1)) \
  --dashboard-agent-listen-port=$((port_base + 2)) --include-dashboard=false "${common[@]}" \
  > "$ray_state/ray-${LIQE_NODES[0]}.log" 2>&1 &
ray_pids+=($!)
for i in $(seq 1 $(( ${#LIQE_NODES[@]} - 1 ))); do
  node="${LIQE_NODES[$i]}"
  srun --nodes=1 --ntasks=1 --overlap -w "$node" --output="$ray_state/ray-$node.log" ray start \
    --address="$LIQE_RAY_ADDRESS" --node-ip-address="$(node_addr "$node")" \
    --dashboard-agent-listen-port=$((port_base + 2 + i)) "${common[@]}" &
  ray_pids+=($!)
done

# Wait until every node has joined; a node whose `ray start` exits ends the wait at once.
# shellcheck disable=SC2154  # liqe_python: set by common.sh
"$liqe_python" -m liqe_dist.run.wait_nodes "$LIQE_RAY_ADDRESS" "${#LIQE_NODES[@]}" --timeout "${LIQE_RAY_WAIT:-180}" &
waiter=$!
while kill -0 "$waiter" 2>/dev/null; do
  for i in "${!ray_pids[@]}"; do
    kill -0 "${ray_pids[$i]}" 2>/dev/null && continue
    kill "$waiter" 2>/dev/null
    slurm_log "Ray on ${LIQE_NODES[$i]} exited during start-up; its log: $ray_state/ray-${LIQE_NODES[$i]}.log"
    tail -n 5 "$ray_state/ray-${LIQE_NODES[$i]}.log" >&2
    exit 1
  done
  sleep 1
done
wait "$waiter"
