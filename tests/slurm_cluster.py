"""Whether the SLURM tests can run here (tests/test_slurm.py; others skip what those prove)."""

from __future__ import annotations

import os
import shutil


def slurm_unavailable() -> str | None:
    """None when a local SLURM cluster can run (installed, or installable as root); else why not."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        return None
    return "SLURM is not installed and this is not root (launch/slurm_local.sh installs slurm-wlm as root)"
