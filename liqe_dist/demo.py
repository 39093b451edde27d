"""The demo: synthetic dataset -> WebDataset shards -> distributed training (Ray Train, DeepSpeed,
2 workers on the CPU) -> untrained vs trained model on the test split (references unseen in
training) -> plots and checkpoints.

    bash launch/demo.sh [--config launch/configs/demo.yaml] [--out runs/demo] [--set KEY=VALUE ...]
    bash launch/demo.sh --config launch/configs/demo_pmt_iqa.yaml     # the same with PMT-IQA
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import torch

from liqe_dist.config import load_yaml, parse_overrides
from liqe_dist.data.adapters import read_dataset
from liqe_dist.data.packing import PackConfig, pack_records
from liqe_dist.data.synthetic import write_synthetic_dataset
from liqe_dist.data.verify import verify_shards
from liqe_dist.eval.shard_eval import TABLE_HEADER, evaluate_shards, table_row
from liqe_dist.console import setup_logging
from liqe_dist.models.registry import build_model
from liqe_dist.models.weights import load_weights, save_weights
from liqe_dist.outputs import claim_dir
from liqe_dist.train.config import TrainConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "demo.yaml"
MIN_GAIN = 0.1  # test SRCC the trained model must add over the untrained one


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="folder for the dataset, shards and run")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (YAML)")
    ap.add_argument("--references", type=int, default=None, help="reference photographs to use (all 9)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (dotted, value as YAML), e.g. --set epochs=2; repeatable")
    args = ap.parse_args(argv)
    setup_logging()
    # the demo replaces its own subfolders (the run, gmad) at every run: only in a folder it owns
    out = claim_dir(args.out, "demo", legacy=lambda p: (p / "synthetic" / "labels.csv").is_file())
    cfg = load_yaml(TrainConfig, args.config, parse_overrides(args.set))

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
    if not report.ok:
        return 1

    cfg = dataclasses.replace(cfg, out_dir=str(out / "train"),
                              datasets=[dataclasses.replace(d, shards=str(packed.out_dir)) for d in cfg.datasets])
    run_dir = Path(cfg.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always trains from scratch (a kept run would resume)
    claim_dir(run_dir, "train")  # the training's folder, holding the untrained weights beside the run
    shards = [d.shards for d in cfg.datasets]

    print(f"3. scoring the test split with the untrained model ({cfg.model.label}, seed {cfg.seed})")
    torch.manual_seed(cfg.seed)  # the same initial weights train_worker starts from
    untrained = build_model(cfg.model)
    save_weights(untrained, run_dir / "untrained.safetensors")
    before = evaluate_shards(untrained, shards, cfg.split, "test", cfg.crops, cfg.eval_batch)

    print(f"4. training: {cfg.workers} Ray Train workers x DeepSpeed ZeRO-{cfg.optim.zero_stage}, "
          f"{cfg.total_steps} steps of {cfg.workers} x {cfg.rank_datasets[0].batch_size} images x "
          f"{cfg.crops.train_crops} crops; progress in {run_dir}/steps.csv")
    from liqe_dist.run.ray_train import run_training

    t0 = time.perf_counter()
    summary = run_training(cfg)
    minutes = (time.perf_counter() - t0) / 60
    best_step = int(summary.get("best/step", cfg.total_steps))

    print(f"5. scoring the test split with the trained model (best by val SRCC: step {best_step})")
    trained = load_weights(run_dir / "best.safetensors")
    after = evaluate_shards(trained, shards, cfg.split, "test", cfg.crops, cfg.eval_batch)

    print(f"\nTest split {cfg.split} (references unseen in training), {cfg.crops.eval_crops} crops per image; "
          f"training took {minutes:.1f} min\n")
    print(TABLE_HEADER)
    failed = []
    for name in before:
        print(table_row("untrained", before[name]))
        print(table_row(f"trained (step {best_step})", after[name]))
        gain = after[name].quality.srcc - before[name].quality.srcc
        if not gain >= MIN_GAIN:
            failed.append(f"{name}: SRCC gain {gain:+.3f} < {MIN_GAIN}")
    print("\nThe synthetic pseudo-MOS is the mean 100 x SSIM of each distortion type and level over the references:\n"
          "a check that training works, not human opinion.")
    # After a Ray Train run, this driver's ray.cluster_resources() never returns (Ray 2.60, Train
    # V2; seen in the demo): the gMAD scoring starts a fresh local cluster instead.
    import ray

    ray.shutdown()
    print("\n6. gMAD: the trained model against its untrained start, over an unlabelled corpus")
    gmad_page = gmad_demo(out, run_dir, cfg)
    print(f"\nplots:       {run_dir}/curves.png (losses, task weights), {run_dir}/scatter.png (score vs MOS)")
    print(f"metrics:     {run_dir}/steps.csv, {run_dir}/eval.csv, TensorBoard: tensorboard --logdir {run_dir}/tb")
    print(f"weights:     {run_dir}/best.safetensors, {run_dir}/final.safetensors, {run_dir}/untrained.safetensors")
    print(f"checkpoints: {run_dir}/checkpoints (resumable training state)")
    print(f"gMAD:        {gmad_page} (pairs.csv, summary.csv and sheets/ beside it)")
    pairs, db = gmad_page.parent / "pairs.csv", gmad_page.parent.parent / "study.sqlite"
    cli = Path(sys.executable).with_name("liqe-dist")
    cli = cli if cli.exists() else "liqe-dist"
    print(f"study:       {cli} gmad study {pairs} --db {db}   (then open http://127.0.0.1:8080/)\n"
          f"             {cli} gmad analyse {pairs} --db {db}")
    if failed:
        print("\nFAILED: the trained model does not clearly beat the untrained one (" + "; ".join(failed) + ")")
        return 1
    return 0


def gmad_demo(out: Path, run_dir: Path, cfg: TrainConfig) -> Path:
    """Pack levels 1, 3 and 5 of every synthetic distortion as an unlabelled corpus, score it
    with the trained and the untrained model on the run's Ray workers, search the gMAD pairs."""
    from liqe_dist.data.corpus import CorpusConfig, pack_corpus
    from liqe_dist.eval.score_shards import ModelSpec, score_shards
    from liqe_dist.gmad.report import run_gmad
    from liqe_dist.gmad.search import LevelRule

    corpus = pack_corpus(f"{out}/synthetic/*/*_[135].png", out / "shards" / "corpus", "corpus",
                         CorpusConfig(shard_max_count=30))
    print("   " + corpus.summary("corpus"))
    scores, pages = out / "gmad" / "scores", out / "gmad" / "pairs"
    shutil.rmtree(out / "gmad", ignore_errors=True)  # new weights every run: old scores are stale
    models = [ModelSpec("trained", str(run_dir / "best.safetensors")),
              ModelSpec("untrained", str(run_dir / "untrained.safetensors"))]
    summary = score_shards([corpus.out_dir], models, scores, workers=cfg.workers, eval_crops=cfg.crops.eval_crops)
    print(f"   scored {summary.images} images with 2 models on {cfg.workers} Ray workers -> {scores}")
    _, files, matrix = run_gmad(scores, ["trained", "untrained"], LevelRule(levels=5), pages)
    print("   " + matrix.replace("\n", "\n   "))
    return files["page"]


if __name__ == "__main__":
    raise SystemExit(main())
