# shellcheck shell=bash
# Sourced by the slurm/*.sbatch scripts: a Ray cluster across this job's nodes, stopped when the
# job's script exits. The head runs on the job's first node (where the script runs), one worker
# per other node via srun; addresses are the nodes' NodeAddr as SLURM knows them. Exports
# LIQE_RAY_ADDRESS (head:port) and Ray's token settings for the `liqe-dist ... --address` command.
#
#   LIQE_SLURM_STATE   shared folder for per-job files: JOBID/ray-NODE.log (each node's `ray start`)
#                      and the job's token while it runs (default: ~/.liqe-dist/slurm-jobs)
#   LIQE_RAY_WAIT      seconds to wait for every node to join (default 180)
# shellcheck source=slurm/ray_node.sh
source "$LIQE_REPO/slurm/ray_node.sh"
mapfile -t LIQE_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
node_addr() { scontrol show node "$1" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p'; }
head_addr="$(node_addr "${LIQE_NODES[0]}")"

# Ports: the head's two (GCS, Ray client server) probed free on the head node, starting from a
# candidate derived from the job id (ray_node.sh); every other port (workers, object manager,
# agents) picked free by the OS on each node. Ray's temp dir: a fresh one per node (mktemp).
[[ "${LIQE_RAY_KEEP_TEMP:-0}" == 1 ]] || ray_temp_dir_prune
ray_tmp="$(ray_temp_dir)"

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
LIQE_RAY_ADDRESS=
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$ray_state/token" LIQE_RAY_ADDRESS

ray_pids=()
ray_stop_nodes() {
  # Only this job's Ray: its `ray start --block` processes stop their node's Ray on SIGTERM (the
  # head's directly, the other nodes' through their job steps), then anything still running from
  # this job's temp dir; after 15 s, SIGKILL (what is left on other nodes ends with the job).
  # Never `ray stop`: it would stop other users' clusters on a shared node.
  local pid
  (( ${#ray_pids[@]} )) || return 0
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
  ray_pids=()
}
ray_cluster_stop() {
  if (( ${#ray_pids[@]} )); then slurm_log "stopping this job's Ray"; fi
  ray_stop_nodes
  rm -f "$ray_state/token"
  ray_temp_dir_remove "$ray_tmp"
}
trap ray_cluster_stop EXIT
trap 'exit 143' TERM  # scancel, preemption, scontrol requeue: stop this job's Ray on the way out

common=(--block --num-cpus="$ray_cpus" --num-gpus="$ray_gpus" --object-store-memory="$ray_store"
  --min-worker-port=0 --max-worker-port=0 --dashboard-agent-listen-port=0 --disable-usage-stats)

# ray_start_nodes PORT: the head at PORT (its client server at PORT + 1), then one worker per
# other node, each in a temp dir of its own made on that node.
ray_start_nodes() {
  local i node
  LIQE_RAY_ADDRESS="$head_addr:$1"
  slurm_log "Ray head on ${LIQE_NODES[0]} ($LIQE_RAY_ADDRESS), ${#LIQE_NODES[@]} node(s), $ray_cpus CPUs and $ray_gpus GPUs per node; Ray's files in $ray_tmp"
  ray start --head --node-ip-address="$head_addr" --port="$1" --ray-client-server-port=$(( $1 + 1 )) \
    --include-dashboard=false --temp-dir="$ray_tmp" "${common[@]}" > "$ray_state/ray-${LIQE_NODES[0]}.log" 2>&1 &
  ray_pids+=($!)
  for i in $(seq 1 $(( ${#LIQE_NODES[@]} - 1 ))); do
    node="${LIQE_NODES[$i]}"
    # shellcheck disable=SC2016  # expanded by the step's shell, on its node
    srun --nodes=1 --ntasks=1 --overlap -w "$node" --output="$ray_state/ray-$node.log" bash -c \
      'source "$1" && shift && d="$(ray_temp_dir)" || exit 1
       echo "Ray temp dir on ${SLURMD_NODENAME:-$(hostname)}: $d"
       trap "ray_temp_dir_remove \"\$d\"" EXIT
       ray start --temp-dir="$d" "$@" & pid=$!
       trap "kill -TERM \$pid 2>/dev/null; wait \$pid; exit 143" TERM  # Ray stopped first, then its dir goes
       wait "$pid"' \
      ray-node "$LIQE_REPO/slurm/ray_node.sh" --address="$LIQE_RAY_ADDRESS" --node-ip-address="$(node_addr "$node")" \
      "${common[@]}" &
    ray_pids+=($!)
  done
}

# ray_wait_nodes: 0 once every node has joined; when a node's `ray start` exits first, 1 with its
# index in ray_failed; else the waiter's status (a timeout).
ray_wait_nodes() {
  local i waiter
  ray_failed=
  # shellcheck disable=SC2154  # liqe_python: set by common.sh
  "$liqe_python" -m liqe_dist.run.wait_nodes "$LIQE_RAY_ADDRESS" "${#LIQE_NODES[@]}" --timeout "${LIQE_RAY_WAIT:-180}" &
  waiter=$!
  while kill -0 "$waiter" 2>/dev/null; do
    for i in "${!ray_pids[@]}"; do  # the head first: a dead head is why the others fail
      kill -0 "${ray_pids[$i]}" 2>/dev/null && continue
      kill "$waiter" 2>/dev/null
      wait "$waiter" 2>/dev/null || true
      ray_failed=$i
      return 1
    done
    sleep 1
  done
  wait "$waiter"
}

# Whether the head failed because its ports were taken in the moment between the probe and its
# start (another job probing at the same time): then the next free pair is tried.
ray_head_port_taken() {
  grep -qE 'Address already in use|Failed to bind|Failed to start the grpc server|already running at' \
    "$ray_state/ray-${LIQE_NODES[0]}.log"
}

ray_port=$(ray_free_ports "$(ray_port_first "$SLURM_JOB_ID")")
for attempt in 1 2 3 4 5; do
  ray_start_nodes "$ray_port"
  if ray_wait_nodes; then break; else rc=$?; fi
  [[ -n "$ray_failed" ]] || exit "$rc"  # the waiter timed out: it named the nodes that joined
  node="${LIQE_NODES[$ray_failed]}"
  if (( ray_failed == 0 && attempt < 5 )) && ray_head_port_taken; then
    slurm_log "port $ray_port or $(( ray_port + 1 )) on $node was taken as Ray started: trying the next free ones"
    ray_stop_nodes
    ray_port=$(ray_free_ports $(( ray_port + 2 )))
    continue
  fi
  slurm_log "Ray on $node exited during start-up; its log: $ray_state/ray-$node.log"
  tail -n 5 "$ray_state/ray-$node.log" >&2
  exit 1
done
