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

import logging
import math
import os
from pathlib import Path

from liqe_dist import provenance
from liqe_dist.config import from_dict
from liqe_dist.data.packing import check_labelled_set, read_manifest
from liqe_dist.hardware import process_group_backend
from liqe_dist.outputs import check_claim, claim_dir
from liqe_dist.train.config import TrainConfig, resolved_config
from liqe_dist.train.state import check_resume

log = logging.getLogger("liqe_dist.run")


def _train_loop(loop_config: dict) -> None:
    import ray.train

    from liqe_dist.console import route_worker_output, setup_logging
    from liqe_dist.train.loop import train_worker

    setup_logging()
    cfg = from_dict(TrainConfig, loop_config["config"])
    route_worker_output(Path(cfg.run_dir) / "logs", ray.train.get_context().get_world_rank())
    train_worker(cfg, report=ray.train.report, launch=loop_config.get("launch"))


# Workers' output stays in their run folders (console.route_worker_output) and Ray's session logs;
# the driver shows the run's own lines (console.follow_console), Ray's from WARNING up.
QUIET = {"log_to_driver": False, "logging_level": logging.WARNING}
# Token authentication being on is the safe default, not news; Ray says so at every start.
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"

_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch for "no multi-node"


def start_local_cluster(cpus: int) -> None:
    """Start a private Ray cluster on this machine whose servers listen on 127.0.0.1 only."""
    import ray

    os.environ[_SINGLE_MACHINE_ENV] = "0"
    # Ray reads the switch when ray._private.ray_constants is first imported; set the attribute
    # too for processes (tests, notebooks) that imported Ray before this call.
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    logging.getLogger(TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **QUIET)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"the local Ray cluster registered at {node_ip}, not 127.0.0.1")


def connect(address: str | None, cpus: float) -> None:
    """Join the cluster at ``address``, or start a private local one with at least ``cpus`` CPUs
    (this machine's count when larger: a run asks for what it needs, not what there is)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return
    if address:
        logging.getLogger(TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
        ray.init(address=address, **QUIET)
    else:
        start_local_cluster(max(os.cpu_count() or 1, math.ceil(cpus)))


def make_trainer(cfg: TrainConfig, callbacks: list | None = None, launch: dict | None = None):
    """The TorchTrainer of one run: ``cfg.workers`` workers running :func:`_train_loop`; Ray
    Train's own files go next to the run folder (``OUT_DIR/ray/NAME``). ``launch``: the command
    line and folder the run was started from (:func:`liqe_dist.provenance.launch`), for its
    ``run.json`` (the workers' own are Ray's)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(TorchTrainer):
        """Train V2's placement-group cleaner asks the dashboard's state API whether its run's
        controller lives; without the dashboard (not installed: ``ray`` without ``[default]``)
        it can never tell, so it never cleans up and never exits (one idle process per stopped
        trial, warning every second). A plain run's group ends with its driver; a search removes
        a stopped trial's group itself (:mod:`liqe_dist.tune.cleanup`)."""

        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    for d in cfg.datasets:  # fail here, once, rather than in every worker of every restart
        read_manifest(Path(d.shards))
    run_dir = Path(cfg.run_dir).resolve()
    return Trainer(
        _train_loop,
        train_loop_config={"config": resolved_config(cfg), "launch": launch or provenance.launch()},
        torch_config=TorchConfig(backend=process_group_backend(cfg.use_gpu)),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.resolved_cpus_per_worker},
                                     placement_strategy=cfg.placement),
        run_config=RunConfig(name=cfg.name, storage_path=str(run_dir.parent / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             callbacks=callbacks or []),
    )


def _was_run(folder: Path) -> bool:
    """A run folder of a version before folders were marked (its event log)."""
    return (folder / "events.jsonl").is_file()


def preflight(cfg: TrainConfig) -> None:
    """What a run needs, checked without Ray (``train --check`` and every start): labelled shard
    sets, a run folder that is new or a training's, and a config a run with checkpoints there
    may resume under (:func:`liqe_dist.train.state.check_resume`)."""
    for i, d in enumerate(cfg.datasets):
        check_labelled_set(d.shards, f"datasets[{i}].shards")
    check_claim(cfg.run_dir, "train", inputs=[d.shards for d in cfg.datasets], what="run folder", legacy=_was_run)
    check_resume(cfg)


def run_training(cfg: TrainConfig, address: str | None = None) -> dict:
    """Train with ``cfg.workers`` Ray Train workers; returns the run's summary (:func:`run_summary`).
    Everything :func:`preflight` checks is checked before a cluster starts."""
    preflight(cfg)
    claim_dir(cfg.run_dir, "train", inputs=[d.shards for d in cfg.datasets], what="run folder", legacy=_was_run)
    log.info("%s", cfg.describe_batches())
    connect(address, cfg.workers * cfg.resolved_cpus_per_worker + 1)
    from liqe_dist.console import follow_console

    log.info("%s: %d Ray Train workers (%s), %d steps; their lines follow, full logs in %s/logs", cfg.name,
             cfg.workers, "GPU" if cfg.use_gpu else "CPU", cfg.total_steps, cfg.run_dir)

    with follow_console(Path(cfg.run_dir) / "logs"):
        make_trainer(cfg, launch=provenance.launch()).fit()
    return run_summary(cfg.run_dir)


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
