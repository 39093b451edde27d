"""What every run folder records about the run that made it, so a reported number can be redone.

``config.yaml``: the fully resolved configuration (every default filled in, paths absolute), in
the form ``--config`` reads back. ``run.json``: the command line, this package's version and git
commit (when run from a checkout; ``dirty`` when it has uncommitted changes), the versions of
the libraries that decide the numbers (torch, open_clip, deepspeed, ray, webdataset, numpy),
Python, the host, the CPU's model and the flags that decide speed and precision, the GPUs, and
the precision and device actually used. A command that runs again in the same folder appends
to ``run.json``'s ``runs`` (a resumed training is a second run of one folder).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from liqe_dist.config import ConfigError
from liqe_dist.files import atomic_path

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LIBRARIES = ("torch", "torchvision", "open_clip_torch", "deepspeed", "ray", "webdataset", "numpy", "scipy")
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict | None:
    """The commit of the checkout this package runs from (and whether it has uncommitted
    changes); None when it is an installed copy or git is not there."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)} if commit else None


def machine() -> dict:
    """The CPU (model, the flags that decide speed and bf16), its core count and the GPUs this
    process sees (``gpus`` is None when torch was not loaded: a command that computes nothing on
    a GPU does not import it to look)."""
    from liqe_dist.hardware import cpu_info

    name, flags = cpu_info()
    out: dict[str, Any] = {"cpu": name, "cpu_flags": [f for f in _FLAGS if f in flags], "cpus": os.cpu_count(),
                           "gpus": None}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
    return out


def launch() -> dict:
    """The command line and folder of this process: what started a run (a Ray worker records
    the driver's, passed to it)."""
    return {"command": list(sys.argv), "cwd": os.getcwd()}


def run_record(**used: Any) -> dict:
    """One run's record: command, versions, host, hardware, and ``used`` (precision, device,
    anything else the run decided at start; ``command``/``cwd`` when another process started it)."""
    from liqe_dist import __version__

    return {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            **launch(), "liqe_dist": __version__, "git": git_commit(),
            "python": platform.python_version(), "host": socket.gethostname(), "platform": platform.platform(),
            "libraries": {lib: _version(lib) for lib in LIBRARIES}, **machine(), **used}


def write_run_record(folder: str | Path, **used: Any) -> dict:
    """Append this run's record to ``folder/run.json`` (created when missing); returns it."""
    path = Path(folder) / RUN_FILE
    runs: list = []
    try:
        old = json.loads(path.read_text())
        runs = old["runs"] if isinstance(old, dict) and isinstance(old.get("runs"), list) else []
    except (OSError, ValueError):
        pass
    record = run_record(**used)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"runs": runs + [record]}, indent=1, default=str) + "\n")
    return record


def config_text(config: dict) -> str:
    """A resolved config as YAML (key order kept: the order a person reads it in)."""
    return yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False, allow_unicode=True)


def write_config(folder: str | Path, config: dict) -> None:
    """``folder/config.yaml``: the resolved ``config`` (replaced in one rename)."""
    with atomic_path(Path(folder) / CONFIG_FILE) as tmp:
        tmp.write_text(config_text(config))


def read_config(folder: str | Path) -> dict | None:
    """The resolved config a run folder recorded, or None when it has none."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: unreadable recorded config ({type(exc).__name__}); restore it, or train "
                          f"under another name") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the recorded config is not a mapping; restore it, or train under another name")
    return data
