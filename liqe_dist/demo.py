"""The demo: synthetic distorted photographs -> a LIQE model -> scores and a summary table.

Today it shows the scoring pipeline end to end with a tiny CLIP whose weights are random, so
its scores carry no information (the table says so); the shards and training issues grow it
into pack -> distributed training -> evaluation -> gMAD.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import load_weights, save_weights
from .data.synthetic import DISTORTIONS, REFERENCES, distort, pseudo_mos, reference_image
from .logs import setup_logging
from .metrics import correlation
from .model import LIQE, build_clip
from .scoring import ImageScore, Scorer, write_scores




def make_images(out: Path, references: int, levels: tuple[int, ...]) -> dict[str, tuple[str, int, float]]:
    """Write references and their distortions; returns path -> (type, level, pseudo-MOS)."""
    out.mkdir(parents=True, exist_ok=True)
    labels = {}
    jobs = [(ref, d, lv) for ref in REFERENCES[:references] for d in ["pristine", *DISTORTIONS]
            for lv in ([0] if d == "pristine" else levels)]
    cache = {}
    for ref, d, lv in tqdm(jobs, desc="synthesising", unit="img"):
        img = cache.setdefault(ref.name, reference_image(ref))
        dist = img if d == "pristine" else distort(img, d, lv, seed=lv)
        path = out / f"{ref.name}__{d.replace(' ', '_')}__{lv}.png"
        dist.save(path)
        labels[str(path)] = (d, lv, pseudo_mos(img, dist))
    return labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--references", type=int, default=3)
    args = ap.parse_args(argv)
    setup_logging()
    torch.manual_seed(0)
    out = Path(args.out)

    labels = make_images(out / "images", args.references, levels=(1, 3, 5))
    weights = save_weights(LIQE(build_clip("liqe-tiny")), out / "liqe-tiny-random.safetensors", "liqe-tiny")
    scorer = Scorer(load_weights(weights), batch_images=8)
    results = [r for r in scorer.score_iter(sorted(labels), progress=True) if isinstance(r, ImageScore)]
    with open(out / "scores.csv", "w", newline="") as f:
        write_scores(results, f)

    by_type = defaultdict(list)
    for r in results:
        d, lv, mos = labels[r.source]
        by_type[d].append((r.quality, mos))
    print(f"\n{'distortion':<22}{'images':>7}{'mean q_hat':>12}{'mean pseudo-MOS':>17}")
    for d, rows in by_type.items():
        q, m = np.array(rows).T
        print(f"{d:<22}{len(rows):>7}{q.mean():>12.3f}{m.mean():>17.1f}")
    c = correlation([r.quality for r in results], [labels[r.source][2] for r in results])
    print(f"\nSRCC(q_hat, pseudo-MOS) over {c.n} images: {c.srcc:.3f}  PLCC: {c.plcc:.3f}")
    print("The model's weights are random, so these correlations are chance: this demo checks the\n"
          "pipeline (synthesis -> weights file -> crops -> 495-way softmax -> scores), not quality.")
    print(f"\nimages: {out / 'images'}\nscores: {out / 'scores.csv'}\nweights: {weights}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
