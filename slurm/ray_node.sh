# shellcheck shell=bash
# Sourced by slurm/ray_cluster.sh (on the head node, and by each other node's `ray start` step):
# the choices a job's Ray makes on a node that other users' jobs share.
#
#   ray_temp_dir            a fresh temp dir for this job's Ray on this node (Ray creates it); prints its path
#   ray_temp_dir_remove D   removes such a dir once the node's Ray has stopped
#   ray_temp_dir_prune      removes the dirs an earlier, killed run of the same job left on this node
#   ray_port_first JOBID    the job's first candidate head port (the first of two)
#   ray_free_ports START    the first of two consecutive ports free on this node, from START on

# A name nobody can prepare: /tmp is world-writable, so a predictable /tmp/ray-JOBID could be
# made (or linked elsewhere) by another user before the job starts. mktemp creates a new
# directory, mode 0700, and never reuses an existing path. Ray makes its temp dir world-writable
# (0777: its way of sharing a node between users), so Ray gets a folder inside ours, which keeps
# everyone else out. Short, as Ray's socket paths below it must stay under 107 bytes.
ray_temp_dir() {
  local own
  own="$(mktemp -d "/tmp/ray-${SLURM_JOB_ID:?}-XXXXXX")" && echo "$own/r"
}

# ray_temp_dir_remove DIR: remove a folder ray_temp_dir made (and only such a one), when the
# job's Ray on this node has stopped: every job would otherwise leave one per node. With
# LIQE_RAY_KEEP_TEMP=1 it stays (Ray's own logs are in it, for a post-mortem).
ray_temp_dir_remove() {
  local own="${1%/r}"
  [[ "${LIQE_RAY_KEEP_TEMP:-0}" != 1 ]] || return 0
  [[ "$own" == /tmp/ray-"${SLURM_JOB_ID:?}"-?????? && -d "$own" && -O "$own" ]] || return 0
  rm -rf -- "$own"
}

# ray_temp_dir_prune: remove this job id's dirs left by an earlier run of the same job (a requeued
# job's previous run, killed before it could clean up): that run has ended, as this one runs.
# Called on the head before any of this run's nodes makes its own.
ray_temp_dir_prune() {
  local old
  for old in /tmp/ray-"${SLURM_JOB_ID:?}"-??????; do
    [[ -d "$old" && -O "$old" && ! -L "$old" ]] && rm -rf -- "$old"
  done
  return 0
}

# Head ports come in pairs (GCS, Ray client server) from 10000 up to the kernel's ephemeral range
# (where the OS picks ports for outgoing connections and for every other Ray port of the job);
# sets ray_port_lo and ray_port_hi.
ray_port_range() {
  ray_port_lo=10000
  read -r ray_port_hi _ 2>/dev/null < /proc/sys/net/ipv4/ip_local_port_range || ray_port_hi=32768
  (( ray_port_hi - ray_port_lo >= 2000 )) || ray_port_hi=65535  # an ephemeral range starting low: the probe decides
}

# Jobs with consecutive ids (the ones most likely to share a node at once) get different
# candidates: one pair per id, repeating only every (hi - lo) / 2 ids (11384 by default).
ray_port_first() {
  ray_port_range
  echo $(( ray_port_lo + 2 * ($1 % ((ray_port_hi - ray_port_lo) / 2)) ))
}

# The candidate is only where the probe starts: a pair in use on this node (another job's Ray,
# any other server) is skipped, so two jobs never share ports however their ids relate.
ray_free_ports() {
  ray_port_range
  "${liqe_python:-python3}" - "$1" "$ray_port_lo" "$ray_port_hi" <<'EOF'
import socket
import sys

start, lo, hi = map(int, sys.argv[1:4])


def free(port: int) -> bool:
    # every address (0.0.0.0): taken when anything on this node listens on the port at all
    try:
        with socket.socket() as s:
            s.bind(("", port))
        return True
    except OSError:
        return False


slots = (hi - lo) // 2
first = (start - lo) // 2 % slots
for k in range(slots):
    port = lo + 2 * ((first + k) % slots)
    if free(port) and free(port + 1):
        print(port)
        sys.exit(0)
sys.exit(f"no two consecutive free ports in {lo}..{hi}")
EOF
}
