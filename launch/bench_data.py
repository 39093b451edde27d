#!/usr/bin/env python
"""Data benchmark: packing vs plain `tar` of the same files, and streaming decode + crop speed.

Two inputs, made in a temporary folder: the synthetic demo dataset (512 px PNGs) and a folder
of 1024x768 JPEGs (the KonIQ-10k shape). Prints a Markdown table; ratios are against the
baseline measured in the same run.

    bash launch/bench.sh data [--jpegs 96] [--references 3]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

from liqe_dist.data.adapters import read_dataset
from liqe_dist.data.packing import PackConfig, pack_records
from liqe_dist.data.stream import TrainBatches, DatasetSpec
from liqe_dist.data.synthetic import write_synthetic_dataset
from liqe_dist.hardware import describe


def make_jpegs(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        base = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((1024, 768), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(768, 1024, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / f"{i:05d}.jpg", quality=90)
        rows.append([f"{i:05d}.jpg", f"{rng.uniform(1, 5):.3f}", f"r{i}"])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "mos", "reference"])
        w.writerows(rows)
    return root / "labels.csv"


def bench_pack(table: Path, name: str, work: Path, workers: int) -> list[tuple]:
    records = read_dataset("csv", table, name)
    files = [r.path for r in records]
    t = time.perf_counter()
    subprocess.run(["tar", "cf", str(work / f"{name}-plain.tar"), *files], check=True, capture_output=True)
    t_tar = time.perf_counter() - t
    t = time.perf_counter()
    pack_records(records, work / "shards" / name, name, {}, PackConfig(workers=workers), progress=False)
    t_pack = time.perf_counter() - t
    n = len(records)
    mb = sum(Path(f).stat().st_size for f in files) / 1e6
    return [(f"{name}: plain tar of the files ({n} images, {mb:.0f} MB)", f"{n / t_tar:.0f} img/s", "1.00x", ""),
            (f"{name}: pack_records, {workers} decoding processes", f"{n / t_pack:.0f} img/s",
             f"{t_tar / t_pack:.2f}x", "decodes every image to validate it; sha256 per shard")]


def bench_stream(shard_dir: Path, name: str, batches: int) -> list[tuple]:
    rows = []
    for workers in (0, 1, 2):
        ds = TrainBatches([DatasetSpec("d", str(shard_dir), 8)], shuffle_buffer=16)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        it = iter(loader)
        next(it)  # start-up (worker spawn, first shard open) is not counted
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        rate = batches * 8 / (time.perf_counter() - t)
        if workers == 0:
            base = rate
        label = "in the main process" if workers == 0 else f"{workers} loader worker(s)"
        rows.append((f"{name}: stream train decode + 3 crops, {label}", f"{rate:.1f} img/s",
                     f"{rate / base:.2f}x", f"{rate / max(workers, 1):.1f} img/s per worker"))
        del it, loader
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jpegs", type=int, default=256)
    ap.add_argument("--references", type=int, default=9)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=12)
    args = ap.parse_args()
    print(describe(), flush=True)  # the hardware the numbers below belong to
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        syn = write_synthetic_dataset(work / "synthetic", references=args.references, progress=False)
        (work / "koniq").mkdir()
        jpg = make_jpegs(work / "koniq", args.jpegs)
        rows += bench_pack(syn, "synthetic", work, args.workers)
        rows += bench_pack(jpg, "jpeg1024", work, args.workers)
        rows += bench_stream(work / "shards" / "synthetic", "synthetic", args.batches)
        rows += bench_stream(work / "shards" / "jpeg1024", "jpeg1024", args.batches)
    print("\n| measurement | result | ratio | note |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
