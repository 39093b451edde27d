#!/usr/bin/env python
"""Core benchmark: prompt encoding at context 77 vs cut, and scoring speed fp32 vs bf16.

Uses ViT-B-32 at full size with random weights (no downloads). Prints a Markdown table;
ratios are against the baseline measured in the same run.

    bash launch/bench.sh core [--images 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from liqe_dist.data.crops import eval_crops
from liqe_dist.models.liqe.model import LIQE, build_clip
from liqe_dist.eval.scoring import Scorer
from liqe_dist.models.liqe.text_encoder import encode_tokens
from liqe_dist.models.liqe.vocabulary import Vocabulary
from liqe_dist.hardware import describe, resolve_device


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    imgs = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        imgs.append(Image.fromarray(small).resize((512, 384), Image.BICUBIC))
    return imgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto", type=resolve_device, help="auto, cpu or cuda (scoring)")
    args = ap.parse_args()
    print(describe(), flush=True)  # the hardware the numbers below belong to
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = build_clip("ViT-B-32").eval()
    prompts = Vocabulary().prompts()
    full_tokens = open_clip.tokenize(prompts)
    model = LIQE(clip)
    cut_tokens = model.prompt_tokens
    rows = []
    with torch.inference_mode():
        t77, e77 = timed(lambda: F.normalize(clip.encode_text(full_tokens), dim=-1), 1)
        tcut, ecut = timed(lambda: F.normalize(encode_tokens(clip, cut_tokens), dim=-1), args.repeats)
    rel = ((e77 - ecut).norm(dim=1) / e77.norm(dim=1)).max().item()
    rows.append(("encode 495 prompts, context 77 (open_clip encode_text)", f"{t77 * 1000:.0f} ms", "1.00x", ""))
    rows.append((f"encode 495 prompts, context {cut_tokens.shape[1]} (cut)", f"{tcut * 1000:.0f} ms",
                 f"{t77 / tcut:.2f}x faster", f"max rel. diff {rel:.1e}"))

    images = bench_images(args.images)
    results = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = LIQE(build_clip("ViT-B-32")).eval()
        m.clip.load_state_dict(clip.state_dict())
        scorer = Scorer(m.to(dtype), batch_images=4, device=args.device)
        scorer.score(images[:1])  # warm-up; caches the prompt embeddings
        t, scores = timed(lambda: scorer.score(images), 1)
        with torch.inference_mode():  # logits of the first 4 images, to compare precisions
            crops = torch.stack([eval_crops(im).pixels for im in images[:4]])
            logits = m(crops.to(args.device)).logits.cpu()
        results[precision] = (t, scores, logits)
    t32, s32, l32 = results["fp32"]
    t16, s16, l16 = results["bf16"]
    diff = max(abs(a.quality - b.quality) for a, b in zip(s32, s16))
    spread = max(a.quality for a in s32) - min(a.quality for a in s32)
    dlogit = (l32 - l16).abs().max().item()
    agree = sum(a.distortion == b.distortion for a, b in zip(s32, s16))
    n = len(images)
    rows.append((f"score {n} images 512x384, 15 crops, fp32 on {args.device}", f"{n / t32:.2f} img/s", "1.00x", ""))
    rows.append((f"score {n} images 512x384, 15 crops, bf16 on {args.device}", f"{n / t16:.2f} img/s", f"{t32 / t16:.2f}x faster",
                 f"max q diff {diff:.4f} (fp32 q spread {spread:.4f}); max logit diff {dlogit:.3f} "
                 f"of range {l32.min().item():.1f}..{l32.max().item():.1f}; top distortion same on {agree}/{n}"))

    print(f"\nViT-B-32 (random weights), torch {torch.__version__}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}\n")
    print("| measurement | result | ratio | note |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
