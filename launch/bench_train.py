#!/usr/bin/env python
"""Training-step benchmark: the reference recipe vs this system, one run, one machine.

(a) reference: every rank encodes all 495 prompts at context 77 every step (what the LIQE code
    does, and what plain data parallelism of it does on each rank);
(b) this system: prompts at their real context length, and with W > 1 each rank encodes only
    its 495/W slice (embeddings all-gathered with autograd; gradients are exact either way).

Each configuration runs in real processes (gloo on CPU, nccl on GPU) with a real DeepSpeed engine
(ZeRO-1), the full multitask loss over the global batch, backward and optimiser step; the same
model, per-rank batch and machine throughout. The default model is a mid-size CLIP (liqe-small:
6-layer ViT-B/32-like image tower of width 384, 6-layer text tower of width 256) because a full
ViT-B-32 step with 495 prompts at context 77 takes minutes on 2 CPU cores; pass --model ViT-B-32
on a bigger machine or a GPU. Prints a Markdown table; ratios are against (a) at the same W.

    bash launch/bench.sh train [--model liqe-small] [--batch 4] [--steps 3] [--worlds 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from liqe_dist.dist.local_group import free_local_port, init_local_rank
from liqe_dist.dist.engine import OptimConfig, build_engine
from liqe_dist.train.weighting import weighted_total
from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.models.registry import build_model
from liqe_dist.models.liqe.objective import TASKS, step_losses
from liqe_dist.hardware import describe, move_batch, resolve_device

RECIPES = {  # name -> (text context, shard prompts over ranks)
    "(a) reference: 495 prompts x context 77 on every rank": ("full", False),
    "(b) liqe-dist: real context, prompts sharded over ranks": ("cut", True),
}


def fake_batch(n: int, crops: int, seed: int, n_scenes: int, n_distortions: int) -> dict:
    """A labelled batch of random crops ``[n, crops, 3, 224, 224]`` (pixel content does not
    change the cost of a step)."""
    g = torch.Generator().manual_seed(seed)
    scenes = (torch.rand(n, n_scenes, generator=g) < 0.3).float()
    return {"images": torch.randint(0, 256, (n, crops, 3, 224, 224), generator=g, dtype=torch.uint8),
            "dataset": torch.zeros(n, dtype=torch.long), "mos": torch.rand(n, generator=g) * 100,
            "has_mos": torch.ones(n, dtype=torch.bool), "scenes": scenes, "has_scenes": scenes.sum(1) > 0,
            "distortion": torch.randint(0, n_distortions, (n,), generator=g),
            "has_distortion": torch.ones(n, dtype=torch.bool)}


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, recipe: str, out: str) -> None:
    context, shard = RECIPES[recipe]
    on_gpu = args.device.type == "cuda"
    init_local_rank(rank, world, port, threads=max(1, args.threads // world), use_gpu=on_gpu)
    torch.manual_seed(0)
    model = build_model(LIQEConfig(name=args.model, text_context=context))
    engine, _, _ = build_engine(model, OptimConfig(lr=1e-7, zero_stage=1, precision=args.precision),
                                total_steps=1000, use_gpu=on_gpu)
    voc = engine.module.vocabulary
    batch = move_batch(fake_batch(args.batch, args.crops, rank, len(voc.scenes), len(voc.distortions)),
                       engine.device)
    times, first_loss = [], None
    for i in range(args.warmup + args.steps):
        if on_gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        terms, _ = step_losses(engine.module, batch, TASKS, shard_prompts=shard)
        loss = weighted_total(terms, {k: 1.0 for k in terms})
        engine.backward(loss)
        engine.step()
        if on_gpu:
            torch.cuda.synchronize()
        if i == 0:
            first_loss = loss.item()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    slowest = torch.tensor([statistics.median(times)])
    torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)  # the step ends for all at the slowest
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": slowest.item(), "loss": first_loss,
                                         "context": int(engine.module.prompt_tokens.shape[1])}))
    torch.distributed.destroy_process_group()


def measure(world: int, recipe: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(rank_main, args=(world, free_local_port(), args, recipe, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="liqe-small")
    ap.add_argument("--batch", type=int, default=4, help="images per rank per step")
    ap.add_argument("--crops", type=int, default=3, help="training crops per image")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median taken)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--worlds", default="1,2", help="numbers of ranks to measure")
    ap.add_argument("--device", default="auto", type=resolve_device, help="auto, cpu or cuda")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    args = ap.parse_args()
    print(describe(), flush=True)  # the hardware the numbers below belong to
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = []
    for world in worlds:
        base = None
        for recipe in RECIPES:
            print(f"measuring W={world}: {recipe} ...", flush=True)
            r = measure(world, recipe, args)
            base = base or r
            rows.append((recipe, world, r["context"], r["step_s"], args.batch / r["step_s"],
                         world * args.batch / r["step_s"], base["step_s"] / r["step_s"], r["loss"]))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    where = gpu or f"{platform.processor() or platform.machine()}, {args.threads} CPU threads shared by the ranks"
    print(f"\n{args.model} (random weights), {args.batch} images x {args.crops} crops per rank, DeepSpeed ZeRO-1, "
          f"torch {torch.__version__}, {where}\n")
    print("| recipe | W | context | step (s) | img/s per rank | img/s total | speed-up vs (a) | loss at step 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe, world, ctx, t, per_rank, total, ratio, loss in rows:
        print(f"| {recipe} | {world} | {ctx} | {t:.2f} | {per_rank:.2f} | {total:.2f} | {ratio:.2f}x | {loss:.6f} |")


if __name__ == "__main__":
    main()
