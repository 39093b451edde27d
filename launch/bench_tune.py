#!/usr/bin/env python
"""Search benchmark: the same search with 1 vs 2 trials at a time, and what a trial costs on top
of its training compared with a plain ``liqe-dist train``.

Every run is a real ``liqe-dist`` command in its own process with its own local Ray cluster:
trials of 2 DeepSpeed workers (the tiny CLIP, 1 CPU each) on a small packed dataset. "Training"
is a run's time from its loop's start to its finish (``events.jsonl``); "overhead" is the rest of
the wall time per run (Ray and Tune start-up, worker processes, imports, model build, placement
groups), i.e. what a trial pays before its first step and after its last.

    bash launch/bench.sh tune [--trials 4] [--steps 4] [--concurrency 1,2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from liqe_dist.data.adapters import read_dataset
from liqe_dist.data.packing import PackConfig, pack_records
from liqe_dist.hardware import describe

LIQE_DIST = str(Path(sys.executable).parent / "liqe-dist")


def make_shards(root: Path, references: int = 20, per_reference: int = 2) -> Path:
    """A small labelled dataset (smooth random images, made-up MOS) packed into shards."""
    rng = np.random.default_rng(0)
    rows = []
    for r in range(references):
        for k in range(per_reference):
            rel = f"ref{r}/img{k}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((232, 224), Image.BILINEAR).save(root / rel)
            rows.append([rel, f"{rng.uniform(10, 90):.2f}", "blur", "animal", f"ref{r}"])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "mos", "distortion", "scenes", "reference"])
        w.writerows(rows)
    out = root / "shards" / "bench"
    pack_records(read_dataset("csv", root / "labels.csv", "bench"), out, "bench", {"format": "csv"},
                 PackConfig(shard_max_count=20, workers=1), progress=False)
    return out


def train_keys(shards: Path, out: Path, steps: int) -> dict:
    return {"name": "plain", "out_dir": str(out / "train"),
            "datasets": [{"name": "bench", "shards": str(shards), "batch_size": 2}],
            "model": {"family": "liqe", "name": "liqe-tiny"}, "optim": {"lr": 1.0e-4, "zero_stage": 1},
            "crops": {"train_crops": 1, "eval_crops": 1}, "epochs": 1, "steps_per_epoch": steps,
            "checkpoint_every": steps, "workers": 2, "shuffle_buffer": 4}


def training_seconds(run_dir: Path) -> float:
    """Loop start to finish, from the run's events (second resolution)."""
    times = {}
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        times.setdefault(e["event"], datetime.fromisoformat(e["time"]).timestamp())
    return times["finish"] - times["start"]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="training steps per trial (one epoch)")
    ap.add_argument("--concurrency", default="1,2", help="trials at a time, comma-separated")
    args = ap.parse_args()
    print(describe(), flush=True)  # the hardware the numbers below belong to
    out = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    shards = make_shards(out / "data")
    train = train_keys(shards, out, args.steps)
    (out / "train.yaml").write_text(yaml.safe_dump(train))
    lrs = [float(x) for x in np.geomspace(1e-4, 1e-3, args.trials)]
    rows = []

    wall = timed([LIQE_DIST, "train", "--config", str(out / "train.yaml")])
    trained = training_seconds(out / "train" / "plain")
    rows.append(("plain `liqe-dist train`", 1, "–", wall, trained, wall - trained))
    print(rows[-1], flush=True)
    for c in (int(x) for x in args.concurrency.split(",")):
        search = {"train": train, "search_space": {"optim.lr": {"grid": lrs}}, "metric": "loss", "mode": "min",
                  "max_concurrent_trials": c, "name": f"c{c}", "storage": str(out / "tune")}
        (out / f"search-{c}.yaml").write_text(yaml.safe_dump(search))
        wall = timed([LIQE_DIST, "tune", "--config", str(out / f"search-{c}.yaml")])
        trials = sorted((out / "tune" / f"c{c}").glob("trial_*"))
        trained = sum(training_seconds(t) for t in trials)
        rows.append((f"`liqe-dist tune`, {c} trial(s) at a time", len(trials), c, wall, trained,
                     (wall - trained / c) / len(trials) * c))
        print(rows[-1], flush=True)

    print(f"\n{os.cpu_count()} CPUs; {args.steps} steps per trial, 2 workers x 1 CPU each\n")
    print("| run | trials | at a time | wall s | training s (sum) | overhead s per trial | wall vs 1 at a time |")
    print("|---|---|---|---|---|---|---|")
    base = next((r[3] for r in rows if r[2] == 1), None)
    for name, n, c, wall, trained, overhead in rows:
        ratio = f"{base / wall:.2f}x" if base and c != "–" else "–"
        print(f"| {name} | {n} | {c} | {wall:.0f} | {trained:.0f} | {overhead:.0f} | {ratio} |")
    print(f"\n(folders under {out})")


if __name__ == "__main__":
    main()
