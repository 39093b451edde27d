"""The training loop one data-parallel rank runs (inside Ray Train, torchrun, or spawned ranks).

step: per-dataset mini-batches (this rank's share) -> the model family's loss terms over the
global batch (``model.training_losses``; LIQE: sharded prompts + local images -> global logits ->
fidelity losses) -> weighted total with the current task weights -> DeepSpeed backward/step ->
task losses to the weighting (period statistics all-reduced, weights checked equal on all ranks)
-> checkpoint every N steps -> evaluation on val/test each epoch -> best model by mean val SRCC.
The loop never names a family: everything family-specific goes through
:class:`~liqe_dist.models.base.IQAModel`.

On the device: the batch is copied once per step (pinned memory, asynchronous) and crops travel
as uint8; nothing reads a device value between forward and backward; after the step the
bookkeeping (loss, task means and counts, images, skipped samples, the task weights' spread
over ranks) is one tensor read once (:func:`step_record`, :func:`read_record`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from liqe_dist.train.state import (check_resume, latest_checkpoint, load_training_checkpoint, prune_checkpoints,
                                   record_run, save_run_weights, save_training_checkpoint)
from liqe_dist.dist.collectives import all_reduce_sum, is_distributed, max_spread, rank, world_size
from liqe_dist.dist.batchnorm import use_global_batchnorm
from liqe_dist.hardware import move_batch, precision_name
from liqe_dist.dist.engine import build_engine, evaluation_module, reset_optimizer_state
from liqe_dist.eval.shard_eval import DatasetEval, evaluate_shards
from liqe_dist.files import atomic_path
from liqe_dist.models.base import IQAModel, LossTerm
from liqe_dist.models.registry import build_model
from liqe_dist.data.stream import TrainBatches
from liqe_dist.train.run_log import RunLog
from liqe_dist.train.config import TrainConfig
from liqe_dist.train.weighting import build_weighting, weighted_total

log = logging.getLogger(__name__)

Reporter = Callable[[dict], None]


def evaluate_all_ranks(model: IQAModel, cfg: TrainConfig, part: str) -> dict[str, DatasetEval]:
    """Each rank scores its exact-once share; predictions are gathered so every rank holds the
    whole part and the same criteria. Each dataset is scored with its own resize and label."""
    local = evaluate_shards(model, cfg.datasets, cfg.split, part, cfg.crops, cfg.eval_batch,
                            cfg.resolved_loader_workers, rank=rank(), world=world_size(), progress=False,
                            device=model.device)
    if is_distributed():
        gathered: list = [None] * world_size()
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    merged = {}
    for name in local:
        ev = DatasetEval(name)
        for part_result in gathered:
            other = part_result[name]
            ev.keys += other.keys
            ev.score += other.score
            ev.mos += other.mos
            for field in ("scene_hits", "scene_labels", "distortion_hits", "distortion_labels", "skipped"):
                setattr(ev, field, getattr(ev, field) + getattr(other, field))
        merged[name] = ev.finish()
    return merged


def _eval_metrics(results: dict[str, DatasetEval], part: str, heads: dict) -> dict[str, float]:
    out = {}
    for name, ev in results.items():
        out[f"{part}/{name}/srcc"] = ev.quality.srcc
        out[f"{part}/{name}/plcc"] = ev.quality.plcc
        if "scene" in heads:
            out[f"{part}/{name}/scene_acc"] = ev.scene_accuracy
        if "distortion" in heads:
            out[f"{part}/{name}/distortion_acc"] = ev.distortion_accuracy
    srccs = [ev.quality.srcc for ev in results.values() if not math.isnan(ev.quality.srcc)]
    out[f"{part}/mean_srcc"] = float(np.mean(srccs)) if srccs else float("nan")
    return out


def _write_rank_info(folder: Path, r: int) -> None:
    """``ranks/rank-R.json``: which process and node run rank R, and the Ray placement group it
    runs in (for operators, for a search to remove a stopped trial's group, and for the tests
    that kill a rank or check placement)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "node_ip": None, "placement_group": None}
    try:
        import ray

        if ray.is_initialized():
            info["node_ip"] = ray.util.get_node_ip_address()
            group = ray.util.get_current_placement_group()
            info["placement_group"] = group.id.hex() if group is not None else None
    except ImportError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{r}.json").write_text(json.dumps(info))


def rank0_value(obj):
    """Rank 0's ``obj`` on every rank. Criteria computed from the same gathered predictions can
    still differ in the last bits between processes (threaded BLAS in the PLCC's logistic fit);
    the best-model choice and the reports must not."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_best(run_dir: Path, best: dict) -> None:
    """``best.json``: the step with the highest mean val SRCC so far and its val/test criteria."""
    with atomic_path(run_dir / "best.json") as tmp:
        tmp.write_text(json.dumps(best, indent=1))


def step_record(loss: torch.Tensor, terms: dict[str, LossTerm], batch: dict, lam: dict[str, float],
                tasks: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """One float64 tensor on ``device`` with a step's bookkeeping, summed or compared over ranks:
    ``[loss, mean_t..., count_t..., images, skipped, lambda spread_t...]`` (tasks in ``tasks``
    order). Two collectives, no host read."""
    local = torch.tensor([batch["images"].shape[0], batch["skipped"]], dtype=torch.float64, device=device)
    lam_t = torch.tensor([lam[t] for t in tasks], dtype=torch.float64, device=device)
    parts = [loss.detach().double().view(1),
             torch.stack([terms[t].mean.detach().double() for t in tasks]),
             torch.stack([terms[t].count.double() for t in tasks]),
             all_reduce_sum(local), max_spread(lam_t)]
    return torch.cat(parts)


def read_record(record: torch.Tensor, tasks: tuple[str, ...]) -> dict:
    """:func:`step_record` on the host (the step's one read of the device)."""
    v, n = record.tolist(), len(tasks)
    return {"loss": v[0], "means": dict(zip(tasks, v[1:1 + n])), "counts": dict(zip(tasks, v[1 + n:1 + 2 * n])),
            "images": int(v[1 + 2 * n]), "skipped": int(v[2 + 2 * n]), "lambda_spread": max(v[3 + 2 * n:])}


def train_worker(cfg: TrainConfig, report: Reporter | None = None, launch: dict | None = None) -> dict:
    """Run (or resume) training on this rank; returns the final metrics. ``launch``: the command
    line and folder that started the run, when that was another process (a Ray driver)."""
    r, world = rank(), world_size()
    run_dir = Path(cfg.run_dir)
    _write_rank_info(run_dir / "ranks", r)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg.model).train()
    if use_global_batchnorm(model) and r == 0:
        log.info("batch norm uses the statistics of the global batch (exact under data parallelism), in float32")
    tasks = model.tasks
    engine, _, scheduler = build_engine(model, cfg.optim, cfg.total_steps, cfg.steps_per_epoch, use_gpu=cfg.use_gpu)
    device = engine.device
    weighting = build_weighting(cfg.weighting, tasks, cfg.steps_per_epoch, cfg.epochs)
    ckpt_dir = run_dir / "checkpoints"
    step, best = 0, {f"{cfg.selection_part}/mean_srcc": -math.inf}
    check_resume(cfg)
    latest = latest_checkpoint(ckpt_dir, world)
    if r == 0:
        record_run(cfg, precision=precision_name(engine.module.dtype), device=str(device), world=world,
                   resumed_from=str(latest) if latest is not None else None, **(launch or {}))
    if latest is not None:
        state = load_training_checkpoint(latest, engine, scheduler, weighting, r, world)
        step = int(state["step"])
        best = {k: float(v) for k, v in state["extra"].get("best", best).items()}
        if r == 0:
            log.info("resumed from %s at step %d", latest, step)
    runlog = RunLog(run_dir, enabled=(r == 0), total_steps=cfg.total_steps, start_step=step)
    redone = runlog.rewind(step)
    runlog.event({"event": "start" if step == 0 else "resume", "step": step, "world": world, "redone_steps": redone})
    # A resumed run draws new samples (its seed includes the step) rather than replaying old ones.
    data = TrainBatches(cfg.rank_datasets, cfg.split, cfg.crops,
                        seed=cfg.seed * 1_000_003 + step, rank=r, world=world, shuffle_buffer=cfg.shuffle_buffer,
                        parts=cfg.train_parts)
    batches = iter(DataLoader(data, batch_size=None, num_workers=cfg.resolved_loader_workers,
                              pin_memory=cfg.use_gpu))
    rank_sizes = [sum(d.batch_size for d in cfg.rank_datasets)] * world  # every rank's images per step
    metrics: dict = {}

    def fresh_model() -> IQAModel:  # the model as built, for a float32 evaluation copy
        with torch.random.fork_rng():  # its random initialisation must not move the run's random state
            return build_model(dataclasses.replace(cfg.model, pretrained=None, checkpoint=None, precision="fp32"))

    def evaluate(step: int) -> None:
        """val/test criteria into ``metrics`` and the logs; a new best (by mean val SRCC) is saved."""
        nonlocal best
        eval_model = evaluation_module(engine, fresh_model)
        for part in cfg.eval_parts:
            results = evaluate_all_ranks(eval_model, cfg, part)
            metrics.update(rank0_value(_eval_metrics(results, part, eval_model.heads)))
            if part == "test":
                runlog.predictions(step, results)
        engine.module.train()
        runlog.eval(metrics)
        # Best = highest mean SRCC of the selection part (val; test as the PMT-IQA public code
        # reports); a part too small to rank (NaN) makes the latest best.
        key = f"{cfg.selection_part}/mean_srcc"
        val = metrics.get(key, math.nan)
        if math.isnan(val) or math.isnan(best.get(key, math.nan)) or val > best[key]:
            best = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}
            best["step"] = step
            save_run_weights(engine, run_dir / "best.safetensors", r, extra={"step": step})
            if r == 0:  # kept current: a run stopped early (a search's ASHA) still has its best
                write_best(run_dir, best)

    if cfg.total_steps == 0:  # zero-shot (Table 4, row 1): evaluate the model as built
        metrics = {"step": 0, "epoch": 0}
        evaluate(0)
        if report is not None:
            report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    while step < cfg.total_steps:
        t0 = time.perf_counter()
        batch = move_batch(next(batches), device)
        lam = weighting.weights()
        terms = engine.module.training_losses(batch, rank_sizes)
        loss = weighted_total(terms, lam)
        lr = scheduler.get_last_lr()[0]  # the lr this step trains at (engine.step() moves to the next)
        engine.backward(loss)
        engine.step()
        step += 1
        rec = read_record(step_record(loss, terms, batch, lam, tasks, device), tasks)
        if rec["lambda_spread"] > 0:
            raise RuntimeError(f"task weights differ across ranks at step {step} (spread {rec['lambda_spread']:.3g})")
        weighting.observe({t: m for t, m in rec["means"].items() if rec["counts"][t] > 0},
                          reduce=lambda stats: all_reduce_sum(stats.to(device)).cpu())
        dt = time.perf_counter() - t0
        metrics = {"step": step, "epoch": (step - 1) // cfg.steps_per_epoch + 1, "loss": rec["loss"],
                   **{f"loss/{k}": m for k, m in rec["means"].items()},
                   **{f"lambda/{k}": v for k, v in lam.items()},
                   "lr": lr, "step_seconds": dt, "images_per_second": rec["images"] / dt,
                   "skipped_samples": rec["skipped"]}
        runlog.step(metrics)
        epoch_end = step % cfg.steps_per_epoch == 0
        if epoch_end and cfg.optim.reset_each_epoch:
            reset_optimizer_state(engine.optimizer)  # before the checkpoint: a resumed run has it reset too
        evaluated = False
        if (epoch_end and (step // cfg.steps_per_epoch) % cfg.eval_every_epochs == 0) or step == cfg.total_steps:
            evaluate(step)
            evaluated = True
        if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
            save_training_checkpoint(ckpt_dir, engine, scheduler, weighting, step, r,
                                     extra={"best": {k: float(v) for k, v in best.items()}})
            if is_distributed():
                dist.barrier()
            if r == 0:
                prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
        if report is not None and evaluated and step < cfg.total_steps:
            report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    save_run_weights(engine, run_dir / "final.safetensors", r, extra={"step": step})
    if r == 0:
        write_best(run_dir, best)
        runlog.plots()
    runlog.event({"event": "finish", "step": step})
    if report is not None and cfg.total_steps > 0:
        # Last, once the run's files are complete: a search may end the trial at this report.
        report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return {**metrics, **{f"best/{k}": v for k, v in best.items()}}
