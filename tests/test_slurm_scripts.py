"""The slurm/ scripts' pieces run for real in bash, without a SLURM cluster: the head-port choice,
the Ray temp dir, the scoring job's check before Ray, and shellcheck. (tests/test_slurm.py runs
the whole scripts on a real two-node cluster.)"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NODE_LIB = REPO / "slurm" / "ray_node.sh"
VENV = Path(sys.executable).parent.parent


def node_lib(script: str, job_id: int = 4242, **env: str) -> str:
    """Run ``script`` in bash after sourcing slurm/ray_node.sh; its stdout."""
    proc = subprocess.run(["bash", "-c", f'set -euo pipefail; source "{NODE_LIB}"; {script}'], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "SLURM_JOB_ID": str(job_id),
                                                       "liqe_python": sys.executable, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def ephemeral_start() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_nearby_job_ids_get_different_head_ports():
    """Every id of a run of 11,384 consecutive job ids (the pairs below the ephemeral range) gets
    its own candidate pair; ids 220 apart collided before (10000 + (id % 220) * 100)."""
    first = 7_000_000
    slots = (ephemeral_start() - 10000) // 2
    ports = [int(p) for p in node_lib(f"for i in $(seq {first} {first + slots - 1}); do ray_port_first $i; done")
             .split()]
    assert len(ports) == slots and len(set(ports)) == slots
    assert all(10000 <= p and p + 1 < ephemeral_start() for p in ports)
    for gap in (1, 100, 220, 440, 1000):
        assert ports[0] != ports[gap], gap


def listening(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("0.0.0.0", port))
    s.listen()
    return s


def is_free(port: int) -> bool:
    try:
        with socket.socket() as s:
            s.bind(("", port))
        return True
    except OSError:
        return False


def test_a_taken_head_port_is_skipped():
    """The probe on the head node skips a pair whose first or second port something listens on
    (another job's Ray), and returns a pair that is free."""
    job = 7_000_123
    candidate = int(node_lib(f"ray_port_first {job}"))
    while not (is_free(candidate) and is_free(candidate + 1)):  # a pair this machine leaves free
        job += 1
        candidate = int(node_lib(f"ray_port_first {job}"))
    assert int(node_lib(f"ray_free_ports {candidate}")) == candidate
    for taken in (candidate, candidate + 1):
        with listening(taken):
            port = int(node_lib(f"ray_free_ports {candidate}"))
            assert port != candidate and port % 2 == candidate % 2
            assert is_free(port) and is_free(port + 1)


def test_the_ray_temp_dir_is_new_and_private(tmp_path):
    """Another user can make /tmp/ray-JOBID (or a link there to a folder of theirs) before the
    job starts: the job's Ray gets a place in a fresh mode-0700 folder of its own instead."""
    job = 900_000 + os.getpid() % 100_000
    predictable = Path(f"/tmp/ray-{job}")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    predictable.unlink(missing_ok=True)
    predictable.symlink_to(theirs)
    made = []
    try:
        for _ in range(2):
            made.append(Path(node_lib("ray_temp_dir", job).strip()))
        for path in made:  # /tmp/ray-JOBID-XXXXXX/r: Ray makes r itself, and world-writable
            own = path.parent
            assert own != predictable and own.name.startswith(f"ray-{job}-") and own.parent == Path("/tmp")
            info = own.lstat()
            assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
            assert not path.exists() and len(str(path)) <= 26  # Ray's sockets below it stay under 107 bytes
        assert made[0] != made[1] and list(theirs.iterdir()) == []
    finally:
        predictable.unlink()
        for path in made:
            path.parent.rmdir()


def test_the_scoring_job_checks_its_arguments_before_ray(tmp_path):
    """slurm/score.sbatch runs `liqe-dist score-shards --check` with the job's arguments first: a
    missing weight file ends the script with status 2 and one line naming it, before
    ray_cluster.sh (which, outside SLURM, would fail at scontrol instead)."""
    missing = tmp_path / "none.safetensors"
    env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(REPO), "LIQE_VENV": str(VENV),
           "LIQE_SLURM_STATE": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(REPO / "slurm" / "score.sbatch"), str(tmp_path / "nowhere"), "--model",
                           f"m={missing}", "--out", str(tmp_path / "scores")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"{missing}: no such file" in proc.stderr
    assert "Ray head" not in proc.stderr and "scontrol" not in proc.stderr
    assert not (tmp_path / "state").exists() and not (tmp_path / "scores").exists()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_the_scripts_are_shellcheck_clean():
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "slurm").glob("*.s*") if p.suffix in (".sh", ".sbatch"))
    proc = subprocess.run(["shellcheck", "-x", *scripts, "launch/slurm_local.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
