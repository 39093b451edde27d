# shellcheck shell=bash
# Sourced first by the slurm/*.sbatch scripts: the repository's environment on PATH, log lines,
# and run_requeueable.
#   LIQE_REPO   the repository (default: the submit folder, i.e. sbatch run from the repo root)
#   LIQE_VENV   its environment (default: $LIQE_REPO/.venv when it exists, else liqe-dist on PATH)
: "${SLURM_JOB_ID:?the slurm/ scripts run inside a SLURM job: submit them with sbatch}"
LIQE_REPO="${LIQE_REPO:-$SLURM_SUBMIT_DIR}"
if [[ -n "${LIQE_VENV:-}" || -x "$LIQE_REPO/.venv/bin/liqe-dist" ]]; then
  PATH="${LIQE_VENV:-$LIQE_REPO/.venv}/bin:$PATH"
fi
command -v liqe-dist >/dev/null || { echo "liqe-dist not found: set LIQE_VENV, or run bash launch/setup.sh in $LIQE_REPO" >&2; exit 2; }
# shellcheck disable=SC2034  # used by ray_cluster.sh
liqe_python="$(dirname "$(command -v liqe-dist)")/python"

slurm_log() { echo "[$(date +%T) slurm job $SLURM_JOB_ID${SLURM_RESTART_COUNT:+ restart $SLURM_RESTART_COUNT}] $*" >&2; }

# run_requeueable CMD...: run the job's command in the background and wait for it. USR1 (sent by
# `#SBATCH --signal=B:USR1@SECONDS` before the time limit) interrupts it (SIGINT: a search saves
# its state), stops Ray and requeues the job; TERM (preemption, scancel, scontrol requeue) reaches
# every process of the job from SLURM itself. A rerun of the same command resumes: a training
# from its newest checkpoint, a search with its finished trials kept.
run_requeueable() {
  local pid rc=0 requeue=0
  "$@" &
  pid=$!
  trap 'slurm_log "time limit near: stopping to requeue"; requeue=1; kill -INT $pid 2>/dev/null' USR1
  while :; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # wait returned for a signal, not because the command ended
  done
  trap - USR1
  if (( requeue )); then
    declare -F ray_cluster_stop >/dev/null && ray_cluster_stop
    slurm_log "requeueing (exit status of the interrupted command: $rc)"
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60  # SLURM ends this run now; the requeued one starts after SLURM's requeue delay
  fi
  return "$rc"
}
