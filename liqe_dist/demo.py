"""The demo: synthetic dataset -> WebDataset shards -> a LIQE model -> evaluation on the test split.

Today the model is a tiny CLIP with random weights, so its numbers carry no information (the
output says so); the training issue grows the demo into distributed training of that model and
a trained-versus-untrained comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .checkpoint import load_weights, save_weights
from .data.adapters import read_dataset
from .data.packing import PackConfig, pack_records
from .data.synthetic import write_synthetic_dataset
from .data.verify import verify_shards
from .evaluation import evaluate_shards
from .logs import setup_logging
from .model import LIQE, build_clip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--references", type=int, default=None, help="reference photographs to use (all 9)")
    ap.add_argument("--split", type=int, default=0, help="which of the 10 splits to evaluate")
    args = ap.parse_args(argv)
    setup_logging()
    torch.manual_seed(0)
    out = Path(args.out)

    print("1. synthesising the demo dataset (scikit-image photographs x 10 distortions x 5 levels)")
    table = out / "synthetic" / "labels.csv"
    if not table.exists():
        write_synthetic_dataset(out / "synthetic", references=args.references)
    print("2. packing it into WebDataset shards (10 splits by reference image)")
    records = read_dataset("csv", table, "synthetic")
    packed = pack_records(records, out / "shards" / "synthetic", "synthetic", {"format": "csv", "root": str(table)},
                          PackConfig(shard_max_count=100))
    print("   " + packed.summary("synthetic"))
    report = verify_shards(packed.out_dir, progress=False)
    print(f"   verified: {report.samples} samples, {'OK' if report.ok else report.problems}")

    print("3. scoring the test split with a tiny LIQE (random weights)")
    weights = save_weights(LIQE(build_clip("liqe-tiny")), out / "liqe-tiny-random.safetensors", "liqe-tiny")
    results = evaluate_shards(load_weights(weights), [packed.out_dir], split=args.split, part="test")

    print(f"\n{'dataset':<12}{'images':>7}{'SRCC':>8}{'PLCC':>8}{'scene acc':>11}{'dist acc':>10}")
    for name, ev in results.items():
        q = ev.quality
        print(f"{name:<12}{q.n:>7}{q.srcc:>8.3f}{q.plcc:>8.3f}{ev.scene_accuracy:>11.3f}{ev.distortion_accuracy:>10.3f}")
    print("\nThe model's weights are random, so these numbers are chance: this run checks the pipeline\n"
          "(synthesis -> shards -> exact-once test stream -> crops -> 495-way softmax -> metrics).\n"
          "The synthetic pseudo-MOS is 100 x SSIM against the reference: a pipeline check, not human opinion.")
    print(f"\nshards:  {packed.out_dir}\nweights: {weights}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
