"""The ``liqe-dist`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from .logs import setup_logging

log = logging.getLogger("liqe_dist")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ViT-B-32", help="open_clip model name or project config (liqe-tiny)")
    g.add_argument("--checkpoint", help="weights file: project .safetensors, released LIQE .pt, pyiqa liqe_mix.pt")
    g.add_argument("--pretrained", help="open_clip pretrained tag (e.g. openai; downloaded by open_clip)")
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")


def cmd_score(args: argparse.Namespace) -> int:
    from .crops import CropConfig
    from .model import ModelConfig, build_model
    from .scoring import ScoreFailure, Scorer, expand_sources, write_scores

    sources, failures = expand_sources(args.paths)
    for f in failures:
        log.error("skipped %s: %s", f.source, f.reason)
    if not sources:
        log.error("nothing to score")
        return 1
    cfg = ModelConfig(name=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                      precision=args.precision)
    if not (cfg.checkpoint or cfg.pretrained):
        log.warning("no --checkpoint or --pretrained: %s has random weights, scores are meaningless", cfg.name)
    scorer = Scorer(build_model(cfg), CropConfig(small_images=args.small_images),
                    batch_images=args.batch_images, num_workers=args.workers)
    skipped = len(failures)

    def good_results():
        nonlocal skipped
        for r in scorer.score_iter(sources, progress=not args.no_progress):
            if isinstance(r, ScoreFailure):
                skipped += 1
                log.error("skipped %s: %s", r.source, r.reason)
            else:
                yield r

    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        n = write_scores(good_results(), out, args.format)
    finally:
        if args.output:
            out.close()
    log.info("scored %d image(s), skipped %d%s", n, skipped, f"; wrote {args.output}" if args.output else "")
    return 0 if n > 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liqe-dist", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score images: quality in [1, 5], scene, distortion")
    p.add_argument("paths", nargs="+", help="image files, folders, or list files (.txt: one path per line)")
    _add_model_args(p)
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    p.add_argument("-o", "--output", help="write here instead of standard output")
    p.add_argument("--batch-images", type=int, default=8, help="images per forward pass (x15 crops)")
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    p.add_argument("--small-images", choices=["upsample", "refuse"], default="upsample",
                   help="images with a side under 224 px: upscale (flagged in the output) or refuse")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return args.func(args)



if __name__ == "__main__":
    sys.exit(main())
