"""Running training on a Ray cluster: a Ray Train TorchTrainer whose workers run
:func:`liqe_dist.train.loop.train_worker` (each building its own DeepSpeed engine).

A local cluster is started unless ``address`` names one (``ray start --head`` on a SLURM node).
The local cluster listens on 127.0.0.1 only: on Linux Ray turns a loopback node address into the
machine's outward address (and its servers then listen on every interface) unless it is told the
cluster is single-machine, which :func:`start_local_cluster` does. Multi-node clusters need
outward addresses; protect them with Ray's token authentication (``RAY_AUTH_MODE=token``).
Checkpoints live in the run folder (a shared file system on clusters); when a worker dies, Ray
restarts the worker group (``max_failures`` times) and the loop resumes from the newest
checkpoint that every rank finished.
"""

from __future__ import annotations

import os
from pathlib import Path

from liqe_dist.config import from_dict, to_dict
from liqe_dist.data.packing import read_manifest
from liqe_dist.hardware import process_group_backend
from liqe_dist.run.ray_process import RUNTIME_ENV
from liqe_dist.train.config import TrainConfig


def _train_loop(loop_config: dict) -> None:
    import ray.train

    from liqe_dist.console import setup_logging
    from liqe_dist.train.loop import train_worker

    setup_logging()
    quiet_worker_logs()
    cfg = from_dict(TrainConfig, loop_config["config"])
    train_worker(cfg, report=ray.train.report)


def quiet_worker_logs() -> None:
    """Drop two lines a Ray Train worker would print every step or evaluation: Ray's echo of each
    report (its logger is named by file path) and torch's deprecation notice for the collective
    DeepSpeed's ZeRO calls; the run's own log lines say the same in readable form."""
    import logging
    import warnings

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch for "no multi-node"


def start_local_cluster(cpus: int) -> None:
    """Start a private Ray cluster on this machine whose servers listen on 127.0.0.1 only."""
    import ray

    os.environ[_SINGLE_MACHINE_ENV] = "0"
    # Ray reads the switch when ray._private.ray_constants is first imported; set the attribute
    # too for processes (tests, notebooks) that imported Ray before this call.
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env=RUNTIME_ENV)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"the local Ray cluster registered at {node_ip}, not 127.0.0.1")


def run_training(cfg: TrainConfig, address: str | None = None) -> dict:
    """Train with ``cfg.workers`` Ray Train workers; returns the last reported metrics."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    for d in cfg.datasets:  # fail here, once, rather than in every worker of every restart
        read_manifest(Path(d.shards))
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True, runtime_env=RUNTIME_ENV)
        else:
            start_local_cluster(max(os.cpu_count() or 1, int(cfg.workers * cfg.resolved_cpus_per_worker) + 1))
    run_dir = Path(cfg.run_dir).resolve()
    cfg_dict = to_dict(cfg)
    # Ray workers start in their own folders: relative paths would not find the run or the shards.
    cfg_dict["out_dir"] = str(Path(cfg.out_dir).resolve())
    for d in cfg_dict["datasets"]:
        d["shards"] = str(Path(d["shards"]).resolve())
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config": cfg_dict},
        torch_config=TorchConfig(backend=process_group_backend(cfg.use_gpu)),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.resolved_cpus_per_worker},
                                     placement_strategy=cfg.placement),
        run_config=RunConfig(name=cfg.name, storage_path=str(run_dir.parent / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    trainer.fit()
    return run_summary(run_dir)


def run_summary(run_dir: str | Path) -> dict:
    """The last step's metrics, the last evaluation and the best one (``best/...``) of a run,
    read from its folder (Ray Train V2 keeps metrics only for reports with Ray checkpoints; this
    project's checkpoints live in the run folder)."""
    import csv
    import json

    run_dir = Path(run_dir)
    out: dict = {}
    for name in ("steps.csv", "eval.csv"):
        path = run_dir / name
        if path.exists():
            rows = list(csv.DictReader(open(path)))
            if rows:
                out.update({k: float(v) for k, v in rows[-1].items() if v not in ("", None)})
    best = run_dir / "best.json"
    if best.exists():
        out.update({f"best/{k}": v for k, v in json.loads(best.read_text()).items()})
    if "step" in out:
        out["step"] = int(out["step"])
    return out
