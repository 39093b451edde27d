#!/usr/bin/env python
"""Scoring speed against pyiqa's LIQE, side by side on identical weights and images (fp32).

pyiqa is not a dependency. Fetch its source without its dependencies (it pins transformers,
datasets, bitsandbytes, opencv...; its LIQE needs none of them):

    .venv/bin/pip install --no-deps --target /tmp/pyiqa pyiqa
    bash launch/bench.sh pyiqa --pyiqa /tmp/pyiqa [--images 16]

pyiqa's LIQE (``pyiqa/archs/liqe_arch.py``, ``clip_model.py``: its own copy of OpenAI's CLIP) runs
as released; only what would download or pull the package's dependencies is replaced: the
OpenAI ``clip`` package's tokenizer (open_clip's, the same BPE), the arch registry, and the CLIP
weights, which both scorers read from one random OpenAI-format ViT-B/32 state dict (QuickGELU).
Both see the same 512x384 JPEGs (no resizing applies at that size: the 15 crops are the same
grid positions), so their scores must agree; the table prints the largest difference.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gmad import photos  # noqa: E402

from liqe_dist.hardware import describe  # noqa: E402


def pyiqa_liqe(source: Path, weights: Path, cache: Path):
    """pyiqa's LIQE class, imported from its source folder with stand-ins for what it downloads."""
    import open_clip

    def register(*args, **kwargs):
        return (lambda obj: obj) if not args or not callable(args[0]) else args[0]

    stubs = {
        "pyiqa": types.ModuleType("pyiqa"),
        "pyiqa.utils": types.ModuleType("pyiqa.utils"),
        "pyiqa.utils.registry": types.SimpleNamespace(ARCH_REGISTRY=types.SimpleNamespace(register=register)),
        "pyiqa.utils.download_util": types.SimpleNamespace(DEFAULT_CACHE_DIR=str(cache)),
        "pyiqa.archs.arch_util": types.SimpleNamespace(load_pretrained_network=None, get_url_from_name=lambda n: n),
        "pyiqa.archs.clip_imports": types.SimpleNamespace(clip=types.SimpleNamespace(tokenize=open_clip.tokenize)),
    }
    archs = types.ModuleType("pyiqa.archs")
    archs.__path__ = [str(source / "pyiqa" / "archs")]
    stubs["pyiqa.archs"] = archs
    sys.modules.update(stubs)
    clip_model = importlib.import_module("pyiqa.archs.clip_model")
    liqe_arch = importlib.import_module("pyiqa.archs.liqe_arch")
    # pyiqa's own build_model on the shared random weights (its load() expects OpenAI's JIT archives)
    liqe_arch.load = lambda name, device: clip_model.build_model(torch.load(weights, weights_only=True)).float()
    return liqe_arch.LIQE(pretrained=False, mtl=True).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pyiqa", required=True, help="folder holding pyiqa's source (pip install --no-deps --target)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch-images", type=int, help="liqe-dist score --batch-images (default: its own)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the images (best kept)")
    args = p.parse_args()
    source = Path(args.pyiqa)
    if not (source / "pyiqa" / "archs" / "liqe_arch.py").exists():
        raise SystemExit(f"{source}: no pyiqa/archs/liqe_arch.py (pip install --no-deps --target {source} pyiqa)")
    import torchvision.transforms.functional as TF
    from PIL import Image

    from liqe_dist.eval.scoring import Scorer
    from liqe_dist.models.liqe.model import build_clip
    from liqe_dist.models.registry import load_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = root / "random_openai_vit_b32.pt"
        state = {k: v for k, v in build_clip("ViT-B-32-quickgelu").state_dict().items() if k != "attn_mask"}
        torch.save(state, weights)
        files = [str(f) for f in sorted(photos(root, args.images).iterdir())]
        theirs = pyiqa_liqe(source, weights, root)
        ours = Scorer(load_model(str(weights), "ViT-B-32"), batch_images=args.batch_images)

        def run_pyiqa() -> list[float]:
            with torch.inference_mode():
                return [float(theirs(TF.to_tensor(Image.open(f).convert("RGB"))[None])) for f in files]

        def run_ours() -> list[float]:
            return [s.quality for s in ours.score(files)]

        run_pyiqa(), run_ours()  # warm-up (text features, kernels)
        # interleaved passes, best of each: this machine's speed drifts by +-15 % between minutes
        timings = {"pyiqa LIQE": (float("inf"), []), "liqe-dist score": (float("inf"), [])}
        for _ in range(args.repeats):
            for name, fn in (("pyiqa LIQE", run_pyiqa), ("liqe-dist score", run_ours)):
                t0 = time.perf_counter()
                scores = fn()
                timings[name] = (min(timings[name][0], time.perf_counter() - t0), scores)
    base = timings["pyiqa LIQE"][0]
    diff = max(abs(a - b) for a, b in zip(timings["pyiqa LIQE"][1], timings["liqe-dist score"][1]))
    print(f"# {describe()}; ViT-B/32 (random weights, QuickGELU), 15 crops, fp32, {args.images} images 512x384, "
          f"torch threads {torch.get_num_threads()}")
    print("| scorer | s/image | img/s | vs pyiqa |\n|---|---|---|---|")
    for name, (seconds, _) in timings.items():
        print(f"| {name} | {seconds / args.images:.3f} | {args.images / seconds:.2f} | {base / seconds:.2f}x |")
    print(f"largest score difference: {diff:.2e}")


if __name__ == "__main__":
    main()
