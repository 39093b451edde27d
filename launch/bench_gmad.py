#!/usr/bin/env python
"""gMAD benchmarks: the pair search, corpus packing and corpus scoring.

* search: time and peak memory of ``liqe_dist.gmad.search`` over N synthetic images scored by M
  correlated models (every ordered pair of models, K levels), against the sort that bounds it
  (one ``np.argsort`` per model, measured in the same run);
* packing: ``pack folder`` (decode, hash, write shards) against plain ``tar`` of the same files;
* scoring: ``score-shards`` in process, with 1 and 2 Ray workers, in fp32 and bf16, against
  ``liqe-dist score``'s scorer on the same images (one model, random weights).

    bash launch/bench.sh gmad [--parts search,packing,scoring] [--sizes 1e5,1e6,1e7] [--models 3]
                              [--levels 8] [--levels-rule toolbox] [--no-reuse] [--images 32]
                              [--model liqe-small]
"""

from __future__ import annotations

import argparse
import resource
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from liqe_dist.gmad.search import LevelRule, search
from liqe_dist.hardware import describe


def corpus(n: int, models: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Scores (float32, as scorers write them) of correlated models and 64-bit content hashes
    with ~1 % duplicates."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n).astype(np.float32)
    scores = {f"model{i}": base + rng.normal(size=n).astype(np.float32) * (0.3 + 0.3 * i) for i in range(models)}
    hashes = rng.integers(0, 2**63, size=n, dtype=np.int64)
    dup = rng.random(n) < 0.01
    hashes[dup] = hashes[rng.integers(0, n, size=int(dup.sum()))]
    return scores, hashes


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_search(args) -> None:
    rule = LevelRule(levels=args.levels, levels_rule=args.levels_rule, reuse=not args.no_reuse)
    print(f"\n# gMAD pair search: {args.models} models ({args.models * (args.models - 1)} ordered pairs), "
          f"{args.levels} {args.levels_rule} levels (default widths), images {'not ' if args.no_reuse else ''}reused")
    print("| images | search s | argsort s | ratio | pairs | peak RSS MB |\n|---|---|---|---|---|---|")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        scores, hashes = corpus(n, args.models)
        t0 = time.perf_counter()
        for a in scores.values():
            np.argsort(a)
        sort_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = search(scores, list(scores), rule, hashes=hashes)
        search_s = time.perf_counter() - t0
        print(f"| {n:,} | {search_s:.2f} | {sort_s:.2f} | {search_s / sort_s:.2f} | {len(result.pairs)} | "
              f"{peak_rss_mb():.0f} |", flush=True)


def photos(root: Path, n: int) -> Path:
    """``n`` 512x384 JPEG photographs-like images (smooth colour fields plus noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "photos"
    folder.mkdir()
    yy, xx = np.mgrid[0:384, 0:512] / 512.0
    for i in range(n):
        f = rng.uniform(1, 6, size=3)
        base = np.stack([np.sin(f[c] * xx + c) * np.cos(f[(c + 1) % 3] * yy) for c in range(3)], axis=-1)
        pixels = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return folder


def bench_packing(root: Path, folder: Path) -> Path:
    from liqe_dist.data.corpus import CorpusConfig, pack_corpus

    files = sorted(folder.iterdir())
    t0 = time.perf_counter()
    with tarfile.open(root / "plain.tar", "w") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    tar_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = pack_corpus(folder, root / "shards" / "bench", "bench", CorpusConfig(shard_max_count=4, workers=2),
                         progress=False)
    pack_s = time.perf_counter() - t0
    print(f"\n# corpus packing: {len(files)} JPEG images 512x384 ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB)")
    print("| method | s | img/s | vs tar |\n|---|---|---|---|")
    print(f"| plain tar (tarfile, no decoding) | {tar_s:.2f} | {len(files) / tar_s:.0f} | 1.00x |")
    print(f"| `pack folder` (decode, content hash, shards; 2 workers) | {pack_s:.2f} | {len(files) / pack_s:.0f} | "
          f"{tar_s / pack_s:.2f}x |", flush=True)
    return result.out_dir


def bench_scoring(root: Path, folder: Path, shards: Path, model_name: str) -> None:
    import ray
    import torch

    from liqe_dist.eval.score_shards import ModelSpec, score_shards
    from liqe_dist.eval.scoring import Scorer
    from liqe_dist.hardware import native_bf16
    from liqe_dist.models.liqe.config import LIQEConfig
    from liqe_dist.models.registry import build_model, load_model
    from liqe_dist.models.weights import save_weights

    torch.manual_seed(0)
    ckpt = root / "model.safetensors"
    save_weights(build_model(LIQEConfig(name=model_name)), ckpt)
    files = [str(f) for f in sorted(folder.iterdir())]
    n = len(files)
    print(f"\n# corpus scoring: {n} images 512x384, LIQE {model_name} (random weights), 15 crops per image")
    print("| scorer | precision | workers | wall s | img/s (wall) | img/s per worker (steady) | vs `liqe-dist score` |")
    print("|---|---|---|---|---|---|---|")
    scorer = Scorer(load_model(str(ckpt)))
    scorer.score(files[:1])  # warm-up

    def baseline() -> float:
        t0 = time.perf_counter()
        scorer.score(files)
        return n / (time.perf_counter() - t0)

    before = baseline()
    rows = []
    runs = [("fp32", 0, 2.0), ("fp32", 1, 2.0), ("fp32", 2, 1.0), ("bf16", 0, 2.0)]
    for i, (precision, workers, cpus) in enumerate(runs):
        if workers == 0:
            torch.set_num_threads(int(cpus))
        t0 = time.perf_counter()
        summary = score_shards([shards], [ModelSpec("m", str(ckpt))], root / f"scores{i}", workers=workers,
                               precision=precision, cpus_per_worker=cpus, progress=False)
        wall = time.perf_counter() - t0
        if ray.is_initialized():
            ray.shutdown()
        rows.append((precision, workers, cpus, wall, summary.images, summary.images / summary.busy_seconds))
    # the baseline before and after the runs, the faster kept: this machine's speed drifts by
    # +-15 % between minutes, and a ratio should not credit the drift
    base = max(before, baseline())
    print(f"| `liqe-dist score` (Scorer, one process) | fp32 | 1 | {n / base:.1f} | {base:.2f} | {base:.2f} | 1.00x |")
    for precision, workers, cpus, wall, images, steady in rows:
        label = "`score-shards` in process" if workers == 0 else f"`score-shards`, Ray ({cpus:g} CPU per worker)"
        note = "" if precision == "fp32" or native_bf16() else " (emulated here)"
        total = steady * max(workers, 1)
        print(f"| {label} | {precision}{note} | {max(workers, 1)} | {wall:.1f} | {images / wall:.2f} | "
              f"{steady:.2f} | {total / base:.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="search,packing,scoring")
    p.add_argument("--sizes", default="1e5,1e6,1e7")
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--levels", type=int, default=8)
    p.add_argument("--levels-rule", choices=["toolbox", "uniform", "quantile"], default="toolbox")
    p.add_argument("--no-reuse", action="store_true", help="an image in one pair at most")
    p.add_argument("--images", type=int, default=32, help="images of the packing and scoring benchmarks")
    p.add_argument("--model", default="liqe-small", help="LIQE model of the scoring benchmark")
    args = p.parse_args()
    parts = args.parts.split(",")
    print(f"# {describe()}")
    if "search" in parts:
        bench_search(args)
    if "packing" in parts or "scoring" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            folder = photos(root, args.images)
            shards = bench_packing(root, folder)
            if "scoring" in parts:
                bench_scoring(root, folder, shards, args.model)


if __name__ == "__main__":
    main()
