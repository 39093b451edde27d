"""Code that runs inside spawned ranks (real processes, gloo, real DeepSpeed engines)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

TENSOR_LABELS = ("dataset", "mos", "has_mos", "scenes", "has_scenes", "distortion", "has_distortion")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def make_problem(workdir: Path, n: int = 7, crops: int = 2, seed: int = 0) -> None:
    """A fixed initial model and global batch: two datasets interleaved (pairs cross ranks),
    a MOS tie, an image without scene labels, one without a distortion label."""
    from liqe_dist.model import build_clip

    torch.manual_seed(seed)
    clip = build_clip("liqe-tiny")
    torch.save(clip.state_dict(), workdir / "init.pt")
    g = torch.Generator().manual_seed(seed)
    scenes = torch.zeros(n, 9)
    for i in range(n):
        scenes[i, (i * 2) % 9] = 1
        if i % 3 == 0:
            scenes[i, (i + 4) % 9] = 1
    scenes[5] = 0
    batch = {
        "images": torch.randn(n, crops, 3, 224, 224, generator=g),
        "dataset": torch.tensor([0, 1, 0, 1, 0, 1, 1])[:n],
        "mos": torch.tensor([3.0, 70.0, 1.5, 20.0, 3.0, 55.0, 40.0])[:n],
        "has_mos": torch.ones(n, dtype=torch.bool),
        "scenes": scenes, "has_scenes": scenes.sum(1) > 0,
        "distortion": torch.tensor([3, 0, 2, -1, 10, 5, 8])[:n],
    }
    batch["has_distortion"] = batch["distortion"] >= 0
    torch.save(batch, workdir / "batch.pt")


WEIGHTS = {"quality": 1.0, "scene": 0.7, "distortion": 1.3}


def build_liqe(workdir: Path):
    from liqe_dist.model import LIQE, build_clip

    clip = build_clip("liqe-tiny")
    clip.load_state_dict(torch.load(workdir / "init.pt", weights_only=True))
    return LIQE(clip).train()


def invariance_rank(rank: int, world: int, port: int, workdir: str, stage: int, optim_kwargs: dict) -> None:
    """One DeepSpeed step on this rank's slice of the global batch; rank 0 saves the result."""
    from liqe_dist.distributed import shard_range
    from liqe_dist.engine import OptimConfig, build_engine
    from liqe_dist.losses import weighted_total
    from liqe_dist.objective import step_losses

    workdir = Path(workdir)
    init_rank(rank, world, port)
    batch = torch.load(workdir / "batch.pt", weights_only=True)
    start, stop = shard_range(batch["images"].shape[0], world, rank)
    local = {k: v[start:stop] for k, v in batch.items()}
    model = build_liqe(workdir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, _, _ = build_engine(model, OptimConfig(zero_stage=stage, **optim_kwargs), total_steps=10)
    terms, _ = step_losses(engine.module, local)
    loss = weighted_total(terms, WEIGHTS)
    engine.backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()
             if p.grad is not None} if stage == 0 else {}
    engine.step()
    updates = {n: p.detach() - before[n] for n, p in engine.module.named_parameters()}
    if rank == 0:
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads, "updates": updates, "weights": weights,
                    "counts": {k: t.count for k, t in terms.items()}}, workdir / f"result_{world}_{stage}.pt")
    dist.barrier()
    dist.destroy_process_group()


def train_rank(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    """Run the training loop on this rank (as Ray Train or torchrun would)."""
    from liqe_dist.config import from_dict
    from liqe_dist.train_config import TrainConfig
    from liqe_dist.trainer import train_worker

    init_rank(rank, world, port)
    train_worker(from_dict(TrainConfig, cfg_dict))
    dist.destroy_process_group()
