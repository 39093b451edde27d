#!/usr/bin/env python
"""bf16 against fp32 on trained weights: one weights file scored on a test part in both
precisions (the same crops), and what bf16 changes: the largest change of a score, the SRCC
between the two score lists, and each one's SRCC / PLCC against MOS.

Scoring a model in bf16 casts every weight and activation (``model.precision: bf16``, what
``liqe-dist score --precision bf16`` and a GPU run's evaluation do). For PMT-IQA the regression
output is then rounded to bf16 steps (2^-9 to 2^-8 of its unit scale) before the crop average.

    bash launch/demo.sh --config launch/configs/demo_pmt_iqa.yaml   # trains the demo's PMT-IQA
    bash launch/bench.sh precision [--weights runs/demo/train/demo-pmt-iqa/best.safetensors] \\
        [--shards runs/demo/shards/synthetic] [--split 0] [--part test]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from scipy import stats

from liqe_dist.data.crops import CropConfig
from liqe_dist.eval.shard_eval import evaluate_shards
from liqe_dist.hardware import describe
from liqe_dist.models.weights import load_weights


def scores(model, shards: str, split: int, part: str, crops: CropConfig) -> tuple[dict[str, float], dict[str, float]]:
    """key -> score and key -> MOS of every image of the part."""
    ev = next(iter(evaluate_shards(model, [shards], split, part, crops, batch_images=8, progress=False).values()))
    return dict(zip(ev.keys, ev.score)), dict(zip(ev.keys, ev.mos))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="runs/demo/train/demo-pmt-iqa/best.safetensors")
    ap.add_argument("--shards", default="runs/demo/shards/synthetic")
    ap.add_argument("--split", type=int, default=0)
    ap.add_argument("--part", default="test")
    args = ap.parse_args()
    print(describe(), flush=True)
    torch.manual_seed(0)
    fp32 = load_weights(args.weights).float().eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16).eval()
    crops = CropConfig(eval_crops=fp32.eval_crops)
    a, mos = scores(fp32, args.shards, args.split, args.part, crops)
    b, _ = scores(bf16, args.shards, args.split, args.part, crops)
    keys = sorted(a)
    x, y, m = (np.array([d[k] for k in keys]) for d in (a, b, mos))
    rows = [("fp32", stats.spearmanr(x, m)[0], stats.pearsonr(x, m)[0]),
            ("bf16", stats.spearmanr(y, m)[0], stats.pearsonr(y, m)[0])]
    print(f"\n{args.weights} ({fp32.family}), {args.shards} split {args.split} {args.part}: {len(keys)} images, "
          f"{crops.eval_crops} crops each\n")
    print("| precision | SRCC vs MOS | PLCC vs MOS |\n|---|---|---|")
    for name, s, p in rows:
        print(f"| {name} | {s:.4f} | {p:.4f} |")
    delta = np.abs(y - x)
    print(f"\nbf16 - fp32: max |delta score| {delta.max():.4f} (1-5 scale), mean {delta.mean():.4f}; "
          f"score spread (std) {x.std():.4f}; SRCC(fp32, bf16) {stats.spearmanr(x, y)[0]:.4f}; "
          f"SRCC vs MOS moved by {rows[1][1] - rows[0][1]:+.4f}")


if __name__ == "__main__":
    main()
