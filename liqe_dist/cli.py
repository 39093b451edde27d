"""The ``liqe-dist`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from liqe_dist.console import setup_logging

log = logging.getLogger("liqe_dist")

PRINT_CONFIG_HELP = "print the resolved config (every default filled in, as the run folder records it) and exit"
CHECK_HELP = "validate the file (and that its shard sets exist), then exit: what a cluster job runs before Ray"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="LIQE: open_clip model name or project config (default ViT-B-32; for .pt files "
                                   "the architecture they hold)")
    g.add_argument("--checkpoint", help="weights file: project .safetensors of any family (detected from the file), "
                                        "released LIQE .pt, pyiqa liqe_mix.pt")
    g.add_argument("--pretrained", help="open_clip pretrained tag (e.g. openai; downloaded by open_clip)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="fp32 (default: the same scores on every machine); bf16; auto: bf16 where the hardware "
                        "computes it natively (AVX512_BF16/AMX CPUs, bf16 GPUs), else fp32 (faster; the scores "
                        "then depend on the machine)")
    g.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")


def cmd_score(args: argparse.Namespace) -> int:
    from liqe_dist.eval.scoring import ScoreFailure, Scorer, default_crops, expand_sources, write_scores
    from liqe_dist.hardware import resolve_device, resolve_precision
    from liqe_dist.models.registry import load_model
    from liqe_dist.models.weights import CheckpointError

    device = resolve_device(args.device)

    sources, failures = expand_sources(args.paths)
    for f in failures:
        log.error("skipped %s: %s", f.source, f.reason)
    if not sources:
        log.error("nothing to score")
        return 1
    if not (args.checkpoint or args.pretrained):
        log.warning("no --checkpoint or --pretrained: %s has random weights, scores are meaningless",
                    args.model or "ViT-B-32")
    try:
        model = load_model(args.checkpoint, args.model, args.pretrained, resolve_precision(args.precision, str(device)),
                           requested=args.precision)
    except (CheckpointError, ValueError, RuntimeError) as exc:  # unreadable or unfitting weights, bad name
        log.error("%s", exc)
        return 2
    crops = default_crops(model, small_images=args.small_images)
    scorer = Scorer(model, crops,
                    batch_images=args.batch_images, num_workers=args.workers, device=device)
    log.info("scoring: %s", scorer.describe())
    skipped = len(failures)

    def good_results():
        nonlocal skipped
        for r in scorer.score_iter(sources, progress=not args.no_progress):
            if isinstance(r, ScoreFailure):
                skipped += 1
                log.error("skipped %s: %s", r.source, r.reason)
            else:
                yield r

    if args.output:
        out = open(args.output, "w", newline="", encoding="utf-8", errors="surrogateescape")
    else:
        sys.stdout.reconfigure(errors="surrogateescape")  # non-UTF-8 file names: their bytes
        out = sys.stdout
    try:
        n = write_scores(good_results(), out, args.format)
    finally:
        if args.output:
            out.close()
    log.info("scored %d image(s), skipped %d%s", n, skipped, f"; wrote {args.output}" if args.output else "")
    return 0 if n > 0 else 1


def cmd_pack(args: argparse.Namespace) -> int:
    from pathlib import Path

    from liqe_dist.data.adapters import read_dataset
    from liqe_dist.data.packing import PackConfig, pack_records
    from liqe_dist.outputs import plain_name

    options = _adapter_options(args)  # first: an option for another format is refused before any work
    if args.format == "folder":
        return _pack_corpus(args)
    name = args.name if args.name is not None else args.format
    plain_name(name, "--name")
    records = read_dataset(args.format, Path(args.root), name, Path(args.lists) if args.lists else None, options)
    cfg = PackConfig(shard_max_bytes=int(args.shard_max_mb * 1024 * 1024), shard_max_count=args.shard_max_count,
                     splits=args.splits, seed=args.seed, order=args.order, order_seed=args.order_seed,
                     workers=args.workers, max_pixels=int(args.max_megapixels * 1_000_000))
    source = {"format": args.format, "root": str(Path(args.root).resolve()),
              "lists": str(Path(args.lists).resolve()) if args.lists else None}
    if getattr(records, "labels", None):
        source["labels"] = records.labels  # which label file (LIVE: dmos.mat or dmos_realigned.mat)
    result = pack_records(records, Path(args.out) / name, name, source, cfg, progress=not args.no_progress,
                          force=args.force)
    log.info("%s", result.summary(name))
    if result.rejected:
        log.warning("%d image(s) rejected: see %s", result.rejected, result.out_dir / "rejects.tsv")
    if result.left_out:
        log.warning("%d entr%s left out by the %s adapter: see %s", result.left_out,
                    "y" if result.left_out == 1 else "ies", args.format, result.out_dir / "rejects.tsv")
    return 0


def _adapter_options(args: argparse.Namespace) -> dict:
    """The reader options ``pack`` passes to the format's adapter (``--live-dmos``); an option
    given for a format that does not take it is an error rather than silently ignored."""
    options = {}
    if args.live_dmos is not None:
        if args.format != "live":
            raise ValueError(f"--live-dmos applies to the live format only, not {args.format}")
        if args.lists:
            raise ValueError("--live-dmos cannot be used with --lists (the lists carry the labels)")
        options["dmos"] = args.live_dmos
    return options


def _pack_corpus(args: argparse.Namespace) -> int:
    from liqe_dist.data.corpus import CorpusConfig, default_name, pack_corpus
    from liqe_dist.outputs import plain_name

    name = args.name if args.name is not None else default_name(args.root)
    cfg = CorpusConfig(shard_max_bytes=int(args.shard_max_mb * 1024 * 1024), shard_max_count=args.shard_max_count,
                       drop_duplicates=args.drop_duplicates, workers=args.workers,
                       max_pixels=int(args.max_megapixels * 1_000_000))
    plain_name(name, "--name")
    result = pack_corpus(args.root, Path(args.out) / name, name, cfg, progress=not args.no_progress,
                         force=args.force)
    log.info("%s", result.summary(name))
    if result.rejected:
        log.warning("%d image(s) rejected: see %s", result.rejected, result.out_dir / "rejects.tsv")
    if result.duplicates:
        log.warning("%d duplicate image(s) (same decoded pixels): see %s", result.duplicates,
                    result.out_dir / "duplicates.tsv")
    return 0


def cmd_score_shards(args: argparse.Namespace) -> int:
    from liqe_dist.eval.score_shards import ModelSpec, check_job, score_shards

    models = [ModelSpec.parse(m) for m in args.model]
    if args.check:
        job = check_job(args.shards, models, args.out, precision=args.precision, eval_crops=args.eval_crops)
        log.info("%s: valid (%d shard(s) of %s; models %s)", args.out, job.shards, ", ".join(job.sets) or "tar files",
                 ", ".join(f"{n} ({f})" for n, f in job.families.items()))
        return 0
    summary = score_shards(args.shards, models, args.out, workers=args.workers, address=args.address,
                           precision=args.precision, device=args.device, batch_images=args.batch_images,
                           cpus_per_worker=args.cpus_per_worker, eval_crops=args.eval_crops,
                           decode_workers=args.decode_workers,
                           progress=not args.no_progress)
    log.info("scored %d image(s) in %d shard(s) (%d already done), %d image(s) could not be scored -> %s",
             summary.images, summary.shards, summary.skipped, summary.errors, args.out)
    if summary.rescored:
        log.warning("%d part file(s) were found but not trusted and were scored again", len(summary.rescored))
    if summary.duplicate_keys:
        log.warning("%d key(s) appear more than once within a shard (named above); gmad search refuses them",
                    summary.duplicate_keys)
    for path in summary.failed:
        log.error("%s: left out (killed every worker that scored it); rerun to try again", path)
    return 1 if summary.failed or summary.short else 0


def cmd_gmad_search(args: argparse.Namespace) -> int:
    from liqe_dist.gmad.report import run_gmad
    from liqe_dist.gmad.search import LevelRule

    rule = LevelRule(levels=args.levels, levels_rule=args.levels_rule, delta=args.delta, trim=args.trim,
                     width=args.width, min_images=args.min_images, reuse=not args.no_reuse)
    result, files, summary = run_gmad(args.scores, args.models, rule, args.out, args.shards,
                                      calibrate=args.calibrate, device=args.device)
    print(summary)
    log.info("%d pairs -> %s; open %s", len(result.pairs), files["pairs"], files["page"])
    return 0


def cmd_gmad_study(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from liqe_dist.gmad.pairs import read_pairs
    from liqe_dist.gmad.study_app import check_listen, create_app, parse_public_url, serve
    from liqe_dist.gmad.study_db import StudyDB, StudySettings, repeats_per_participant

    check_listen(args.port, args.threads)  # before the database is made: a bad flag changes nothing
    if args.public_url is not None:
        parse_public_url(args.public_url)
    given = {k: v for k, v in (("repeat_fraction", args.repeat_fraction), ("repeat_gap", args.repeat_gap),
                                ("seed", args.seed), ("scale", args.scale), ("schedule", args.schedule))
             if v is not None}
    made = StudyDB.settings_of(args.db)
    try:
        settings = StudySettings(**((made.model_dump() if made else {}) | given))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    pairs = read_pairs(args.pairs)
    app = create_app(pairs, args.db, settings, host=args.host, port=args.port, public_url=args.public_url)
    repeats = repeats_per_participant(len(pairs.pairs), settings)
    log.info("%d pairs (%d trials per participant, %d repeated; %s scale, %s schedule), answers in %s",
             len(pairs.pairs), len(pairs.pairs) + repeats, repeats, settings.scale, settings.schedule, args.db)
    serve(app, args.host, args.port, args.threads)
    return 0


def cmd_gmad_analyse(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from liqe_dist.gmad.analyse import AnalysisOptions, run_analysis

    try:
        options = AnalysisOptions(level_weights=args.level_weights, screening=args.screening,
                                  bootstrap=args.bootstrap, seed=args.seed)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    source = Path(args.db if args.db is not None else args.answers)
    out = Path(args.out) if args.out else source.with_name(source.stem + "_analysis")
    _, text = run_analysis(args.pairs, out, db=args.db, answers=args.answers, options=options)
    print(text)
    return 0


def cmd_shards_verify(args: argparse.Namespace) -> int:
    from liqe_dist.data.verify import verify_shards

    bad = 0
    for d in args.dirs:
        report = verify_shards(d, decode=not args.no_decode, progress=not args.no_progress)
        for problem in report.problems:
            log.error("%s", problem)
        for warning in report.warnings:
            log.warning("%s", warning)
        log.info("%s: %d samples, %s", d, report.samples, "OK" if report.ok else f"{len(report.problems)} problem(s)")
        bad += not report.ok
    return 1 if bad else 0


def cmd_shards_info(args: argparse.Namespace) -> int:
    from liqe_dist.data.verify import format_table, shards_info

    print(format_table(shards_info(args.root)))
    return 0


def cmd_shards_catalog(args: argparse.Namespace) -> int:
    from liqe_dist.data.catalog import format_catalog

    print(format_catalog())
    return 0


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from liqe_dist.data.synthetic import write_synthetic_dataset

    table = write_synthetic_dataset(args.out, references=args.references, workers=args.workers,
                                    progress=not args.no_progress)
    log.info("wrote %s (pseudo-MOS = mean 100 x SSIM per distortion and level: not human opinion)", table)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from liqe_dist.config import ConfigError, load_yaml, parse_overrides
    from liqe_dist.provenance import config_text
    from liqe_dist.outputs import OutputError
    from liqe_dist.run.ray_train import preflight, run_training
    from liqe_dist.train.config import TrainConfig, resolved_config

    cfg = load_yaml(TrainConfig, args.config, parse_overrides(args.set))
    if args.workers is not None:
        try:
            cfg = dataclasses.replace(cfg, workers=args.workers)
        except ValueError as exc:
            raise ConfigError(f"--workers: {exc}") from None
    if args.print_config:
        print(config_text(resolved_config(cfg)), end="")
        return 0
    if args.check:
        try:
            preflight(cfg)
        except (ConfigError, OutputError) as exc:
            raise ConfigError(f"{args.config}: {exc}") from None
        log.info("%s: valid (%s)", args.config, cfg.describe_batches())
        return 0
    metrics = run_training(cfg, address=args.address)
    best = {k.removeprefix("best/"): v for k, v in metrics.items() if k.startswith("best/") and k.endswith("srcc")}
    log.info("finished: %s; outputs in %s", ", ".join(f"{k} {v:.3f}" for k, v in best.items()), cfg.run_dir)
    return 0


def _checked(path: str, shard_sets: list[str] | dict[str, str]) -> int:
    """``--check``: the file is valid and its shard sets are packed sets with MOS (what a cluster
    job verifies before it starts Ray). ``shard_sets``: a training config's datasets in order, or
    ``{dotted key: shards}``."""
    from liqe_dist.config import ConfigError
    from liqe_dist.data.packing import check_labelled_set

    named = shard_sets if isinstance(shard_sets, dict) else {f"datasets[{i}].shards": s
                                                             for i, s in enumerate(shard_sets)}
    for key, shards in named.items():
        try:
            check_labelled_set(shards, key)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    log.info("%s: valid", path)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from liqe_dist.config import parse_overrides
    from liqe_dist.provenance import config_text
    from liqe_dist.train.config import resolved_config
    from liqe_dist.tune.config import load_search, search_dict, trial_shard_sets
    from liqe_dist.tune.results import markdown_table, summary_columns
    from liqe_dist.tune.search import run_search

    search = load_search(args.config, parse_overrides(args.set))
    if args.print_config:
        print(config_text({**search_dict(search), "train": resolved_config(search.trial_config({}))}), end="")
        return 0
    if args.check:
        return _checked(args.config, trial_shard_sets(search))
    rows = run_search(search, address=args.address)
    exp = search.experiment_dir
    print(f"\n{search.name}: {len(rows)} trial(s), best first by {search.metric} ({search.mode})\n")
    print(markdown_table(rows, summary_columns(search)))
    print(f"\nresults: {exp}/results.csv, results.md; plot: {exp}/search.png")
    if (exp / "best.yaml").exists():
        print(f"best config: {exp}/best.yaml  (liqe-dist train --config {exp}/best.yaml)")
    return 0


def cmd_protocol(args: argparse.Namespace) -> int:
    import json

    from liqe_dist.config import parse_overrides, to_dict
    from liqe_dist.provenance import config_text
    from liqe_dist.train.config import resolved_config
    from liqe_dist.tune.config import trial_shard_sets
    from liqe_dist.tune.protocol import load_protocol, run_protocol

    protocol = load_protocol(args.config, parse_overrides(args.set))
    if args.print_config:
        resolved = {**json.loads(json.dumps(to_dict(protocol), default=str)),
                    "train": resolved_config(protocol.search().trial_config({}))}
        print(config_text(resolved), end="")
        return 0
    if args.check:  # (load_protocol checked the cross-dataset sets)
        return _checked(args.config, trial_shard_sets(protocol.search()))
    report = run_protocol(protocol, address=args.address)
    print("\n" + report.read_text())
    print(f"report: {report}, {report.with_suffix('.csv')}; trials: {report.parent}/results.csv")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from liqe_dist.config import ConfigError, from_dict
    from liqe_dist.tune.config import SearchConfig
    from liqe_dist.tune.protocol import PROTOCOL_FILE, write_report
    from liqe_dist.tune.results import SEARCH_FILE, markdown_table, summary_columns, write_results

    exp = Path(args.dir)
    if not (exp / SEARCH_FILE).is_file():
        raise ConfigError(f"{exp}: not a search or protocol folder (no {SEARCH_FILE})")
    search = from_dict(SearchConfig, json.loads((exp / SEARCH_FILE).read_text()))
    search = dataclasses.replace(search, storage=str(exp.resolve().parent), name=exp.resolve().name)  # moved folders
    rows = write_results(search)
    print(markdown_table(rows, summary_columns(search)))
    if (exp / PROTOCOL_FILE).is_file() or "split" in search.search_space:
        print("\n" + write_report(exp).read_text())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from liqe_dist.config import ConfigError, load_yaml, parse_overrides, to_dict
    from liqe_dist.eval.scoring import default_crops, describe_run
    from liqe_dist.eval.shard_eval import TABLE_HEADER, claim_eval_dir, evaluate_shards, table_row, write_results
    from liqe_dist.hardware import precision_name, resolve_device, resolve_precision
    from liqe_dist.models.registry import build_model, get_family, load_model
    from liqe_dist.provenance import config_text, write_config, write_run_record
    from liqe_dist.train.config import TrainConfig, resolved_config

    device = resolve_device(args.device)
    precision = args.precision and resolve_precision(args.precision, str(device))
    if args.config:
        cfg = load_yaml(TrainConfig, args.config, parse_overrides(args.set))
        if args.precision == "auto" and not get_family(cfg.model.family).model.auto_bf16:
            precision = "fp32"  # as load_model: this family scores in fp32 under auto
        changes = {k: v for k, v in (("checkpoint", args.checkpoint), ("pretrained", args.pretrained),
                                    ("precision", precision), ("name", args.model)) if v is not None}
        try:
            model_cfg = dataclasses.replace(cfg.model, **changes)
        except TypeError:
            raise ConfigError(f"--model/--pretrained do not apply to a {cfg.model.family} model") from None
        cfg = dataclasses.replace(cfg, model=model_cfg)
        if args.print_config:
            print(config_text(resolved_config(cfg)), end="")
            return 0
        torch.manual_seed(cfg.seed)  # the initial weights training with this config would start from
        model, label, crops = build_model(model_cfg), model_cfg.label, cfg.crops
        shards = args.shards or [d.shards for d in cfg.datasets]
        sets = args.shards or cfg.datasets  # a config's datasets bring their resize and label
        split = cfg.split if args.split is None else args.split
        batch = cfg.eval_batch
    else:
        if args.set or args.print_config:
            raise ConfigError(f"{'--set' if args.set else '--print-config'} needs --config")
        model = load_model(args.checkpoint, args.model, args.pretrained, precision or "fp32", requested=args.precision)
        weights = (Path(args.checkpoint).name if args.checkpoint
                   else f"pretrained {args.pretrained}" if args.pretrained else "random")
        label = f"{model.family} ({weights})"
        crops, shards, split, batch = default_crops(model), args.shards, args.split or 0, 8
        sets = shards
    if not shards:
        raise ConfigError("no shard sets: give SHARDS or --config")
    if args.out:
        claim_eval_dir(args.out, inputs=[*shards, args.checkpoint, args.config])
        absolute = {k: v and str(Path(v).resolve()) for k, v in (("checkpoint", args.checkpoint),
                                                                  ("config", args.config))}
        write_config(args.out, {"shards": [str(Path(d).resolve()) for d in shards], "split": split,
                                "part": args.part, "crops": to_dict(crops), "batch_images": batch,
                                "model": args.model, "pretrained": args.pretrained, **absolute,
                                "train_config": resolved_config(cfg) if args.config else None})
        write_run_record(args.out, precision=precision_name(model.dtype), device=str(device))
    log.info("evaluating: %s", describe_run(model, device, crops, batch))
    results = evaluate_shards(model.to(device), sets, split, args.part, crops, batch, args.workers,
                              progress=not args.no_progress)
    what = "whole sets" if args.part == "all" else f"{args.part} part of split {split}"
    print(f"\n{what}, {crops.eval_crops} crops per image\n")
    print(TABLE_HEADER)
    for ev in results.values():
        print(table_row(label[:25], ev))
    if args.out:
        write_results(results, args.out, args.part)
        log.info("wrote %s/metrics.csv, predictions.csv, scatter.png", args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from liqe_dist import __version__

    parser = argparse.ArgumentParser(prog="liqe-dist", description=__doc__)
    parser.add_argument("--version", action="version", version=f"liqe-dist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score images: quality in [1, 5] and the model's label heads (LIQE: scene, "
                                     "distortion)")
    p.add_argument("paths", nargs="+", help="image files, folders, or list files (.txt: one path per line)")
    _add_model_args(p)
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    p.add_argument("-o", "--output", help="write here instead of standard output")
    p.add_argument("--batch-images", type=int, help="images per forward pass, x the family's crops (LIQE 15, "
                                                    "PMT-IQA 4); default 2 on the CPU, 16 on a GPU")
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    p.add_argument("--small-images", choices=["upsample", "refuse"], default="upsample",
                   help="images with a side under 224 px: upscale (flagged in the output) or refuse")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_score)

    from liqe_dist.data.adapters import ADAPTERS

    p = sub.add_parser("pack", help="pack a dataset into labelled WebDataset shards, or an unlabelled corpus "
                                    "(format 'folder')")
    p.add_argument("format", choices=sorted(ADAPTERS) + ["folder"],
                   help="how the dataset is distributed (csv: generic table; folder: unlabelled images for scoring "
                        "and gMAD, resumable)")
    p.add_argument("root", help="the dataset's folder (for csv: the table; with --lists: the image folder; for "
                                "folder: a folder, a list file of image paths, or a quoted glob)")
    p.add_argument("--name", help="the set's name, one plain folder name (default: the format; for folder: the "
                                  "resolved folder's name, a list file's stem or a glob's leading folder)")
    p.add_argument("--drop-duplicates", action="store_true",
                   help="folder: leave out images whose decoded pixels equal an earlier image's (always reported)")
    p.add_argument("--lists", help="reference label lists: a list file, or a folder of split folders 1..10")
    p.add_argument("--live-dmos", choices=["auto", "original", "realigned"],
                   help="live: labels from dmos.mat (original), or dmos_realigned.mat (realigned: the PMT-IQA "
                        "code's; negative entries left out); auto (default): dmos.mat if present")
    p.add_argument("--out", default="shards", help="shard sets go to OUT/NAME")
    p.add_argument("--splits", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the ten splits")
    p.add_argument("--order", choices=["shuffled", "source"], default="shuffled",
                   help="record order in the shards: seeded random (mixes references in every shard) or as listed")
    p.add_argument("--order-seed", type=int, default=0, help="seed of the shuffled record order")
    p.add_argument("--max-megapixels", type=float, default=200.0,
                   help="larger images are rejected as likely decompression bombs (from their header)")
    p.add_argument("--shard-max-mb", type=float, default=256.0)
    p.add_argument("--shard-max-count", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical set exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("score-shards", help="score packed shards with several models, one parquet file per shard "
                                            "(resumable; Ray workers or in-process)")
    p.add_argument("shards", nargs="+", help="packed shard sets (folders) or .tar shards")
    p.add_argument("--model", action="append", default=[], required=True, metavar="NAME=CHECKPOINT",
                   help="a model's column name and weights file (any family); repeat for more models")
    p.add_argument("--out", required=True, help="folder of the results: <shard>.parquet per shard, manifest.json")
    p.add_argument("--workers", type=int, default=0,
                   help="Ray workers (actors: one per GPU, or per --cpus-per-worker CPUs); 0: in this process")
    p.add_argument("--address", help="Ray cluster to join (HEAD:PORT); default: a private local one")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per worker")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 where the worker's hardware computes it natively, else fp32")
    p.add_argument("--device", default="auto", help="auto (a GPU when the worker has one), cpu or cuda")
    p.add_argument("--batch-images", type=int, help="images per forward pass (default 2 on the CPU, 16 on a GPU)")
    p.add_argument("--decode-workers", type=int, help="decoding processes per worker (default: on GPU workers "
                                                      "--cpus-per-worker - 1, else 0)")
    p.add_argument("--eval-crops", type=int, help="crops per image for every model (default: each family's own, "
                                                  "LIQE 15, PMT-IQA 4; fewer is faster and less exact)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--check", action="store_true",
                   help="validate the models (names, weight file headers), the shard inputs and --out, then exit: "
                        "what a cluster job runs before Ray")
    p.set_defaults(func=cmd_score_shards)

    gmad = sub.add_parser("gmad", help="gMAD competition: search the pairs, run the study with people, analyse it"
                          ).add_subparsers(dest="gmad_command", required=True)
    p = gmad.add_parser("search", help="search the pairs of every (defender, attacker) in a score-shards folder; "
                                       "pairs.csv, an HTML page, PNG sheets")
    p.add_argument("scores", help="a score-shards output folder")
    p.add_argument("--models", nargs="+", required=True, help="two or more model columns of the scores")
    p.add_argument("--levels", type=int, default=6, help="levels per defender (K, default 6 as the toolbox)")
    p.add_argument("--levels-rule", choices=["toolbox", "uniform", "quantile"], default="toolbox",
                   help="toolbox (default, the gMAD toolbox's): centres at the midpoints of K equal bins over the "
                        "defender's full range, each level the images strictly within +-DELTA; uniform: K centres "
                        "from the --trim to the 1 - trim quantile, +-WIDTH spacings; quantile: the same over ranks")
    p.add_argument("--delta", type=float,
                   help="toolbox levels: the absolute half-width, in the units the levels are formed on (default "
                        "0.09 x the defender's range; with --calibrate 9 x the calibration MOS span / 100)")
    p.add_argument("--trim", type=float,
                   help="uniform/quantile levels: fraction of each tail left out of the level range (default 0.01)")
    p.add_argument("--width", type=float,
                   help="uniform/quantile levels: a level holds the images within +- WIDTH level spacings of its "
                        "centre (<= 0.5; default 0.25)")
    p.add_argument("--min-images", type=int, default=2, help="fewer candidates: the level is skipped")
    p.add_argument("--no-reuse", action="store_true",
                   help="an image is in one pair at most (not the toolbox), given to the pairs of largest rank gap "
                        "first: the result does not depend on the order of --models")
    p.add_argument("--calibrate", metavar="SHARDSET",
                   help="a labelled shard set (liqe-dist pack): score it with each model's recorded checkpoint, fit "
                        "the toolbox's 4-parameter logistic onto its MOS and search on the mapped scores "
                        "(calibration.json)")
    p.add_argument("--device", default="auto", help="where --calibrate scores: auto (a GPU when there is one), "
                                                    "cpu, cuda or cuda:N")
    p.add_argument("--shards", nargs="*", default=[], help="shard sets whose images the pairs show (default: the "
                                                           "ones the scores' manifest names)")
    p.add_argument("--out", default="gmad", help="folder for pairs.csv, summary.csv, skipped.csv, index.html, "
                                                 "sheets/ (and calibration.json)")
    p.set_defaults(func=cmd_gmad_search)

    p = gmad.add_parser("study", help="web app in which people judge the pairs (answers saved at once; resumable)",
                        description="Serve the study of a pairs.csv (from `gmad search`, its images/ beside it). "
                                    "Participants open the address, enter an id, pass four practice pairs, then "
                                    "judge each pair, shown at native size; the same id resumes. --scale, --schedule "
                                    "and the repeat options are fixed when --db is made.")
    p.add_argument("pairs", help="pairs.csv written by `liqe-dist gmad search`")
    p.add_argument("--db", required=True, help="SQLite file of the answers (made if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080, help="port, 0 to 65535 (0: any free port)")
    p.add_argument("--repeat-fraction", type=float,
                   help="share of the pairs shown a second time, for the consistency check (default 0.1)")
    p.add_argument("--repeat-gap", type=int, help="at least this many trials between a pair's two showings "
                                                  "(default 3)")
    p.add_argument("--seed", type=int, help="seed of the participants' schedules (default 0)")
    p.add_argument("--scale", choices=["slider", "buttons"],
                   help="slider: the gMAD toolbox's -100..100 slider (left is better / uncertain / right is better; "
                        "the default); buttons: left / same / right, stored as -100 / 0 / 100")
    p.add_argument("--schedule", choices=["fixed", "random"],
                   help="fixed: one order and side assignment, drawn from the seed, for every participant (the "
                        "toolbox; the default); random: each participant's own")
    p.add_argument("--threads", type=int, default=8, help="request threads (1 to 256)")
    p.add_argument("--public-url", help="the address participants open when it is not the listening one "
                                        "(--host 0.0.0.0, a reverse proxy), e.g. http://lab-pc.local:8080/: "
                                        "requests naming another host are refused (DNS rebinding)")
    p.set_defaults(func=cmd_gmad_study)

    p = gmad.add_parser("analyse", help="the gMAD verdict as the authors' toolbox defines it: aggressiveness and "
                                        "resistance, Thurstone ranking, subject screening, bootstrap intervals",
                        description="Analyse the answers to a pairs.csv, from a `gmad study` database (--db) or an "
                                    "answers CSV gathered elsewhere (--answers: participant,pair,answer[,repeat,"
                                    "response_ms]; answer best/worst/same or -100..100, positive = the attacker's "
                                    "best image preferred).")
    p.add_argument("pairs", help="the pairs.csv the study showed")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", help="the study's SQLite file")
    source.add_argument("--answers", help="an answers CSV (participant,pair,answer[,repeat,response_ms])")
    p.add_argument("--out", help="output folder (default: the answers' file name + '_analysis', beside it)")
    p.add_argument("--level-weights", choices=["images", "uniform"], default="images",
                   help="images: levels weigh by the defender's images in them, N_jk (toolbox); uniform: alike")
    p.add_argument("--screening", choices=["toolbox", "bt500", "none"], default="toolbox",
                   help="subject screening: toolbox (data_analysis.m), bt500 (ITU-R BT.500's P/Q), none")
    p.add_argument("--no-screening", dest="screening", action="store_const", const="none",
                   help="same as --screening none")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="resamples of participants for the 95%% intervals (0: no intervals)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.set_defaults(func=cmd_gmad_analyse)

    shards = sub.add_parser("shards", help="inspect packed shard sets").add_subparsers(dest="shards_command", required=True)
    p = shards.add_parser("verify", help="check shards against their manifest and decode every image")
    p.add_argument("dirs", nargs="+")
    p.add_argument("--no-decode", action="store_true", help="check counts and checksums only")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_shards_verify)
    p = shards.add_parser("info", help="summary table of the shard sets under a folder")
    p.add_argument("root", nargs="?", default="shards")
    p.set_defaults(func=cmd_shards_info)
    p = shards.add_parser("catalog", help="the supported datasets: pack command, MOS scale, images in a complete pack")
    p.set_defaults(func=cmd_shards_catalog)

    p = sub.add_parser("train", help="distributed training (Ray Train + DeepSpeed) from a YAML config")
    p.add_argument("--config", required=True, help="YAML file (see launch/configs/)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--workers", type=int, help="override the config's number of data-parallel workers")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted, value as YAML), e.g. --set optim.lr=1e-5; repeatable")
    p.add_argument("--check", action="store_true", help=CHECK_HELP)
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="hyper-parameter search: Ray Tune trials, each a distributed training",
                       description="Run the search a SEARCH.yaml describes (see launch/configs/tune_demo.yaml); "
                                   "running it again after the driver died resumes it.")
    p.add_argument("--config", required=True, help="search file (YAML)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a search key, e.g. --set num_samples=4 or --set train.epochs=2; repeatable")
    p.add_argument("--check", action="store_true", help=CHECK_HELP)
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("protocol", help="the paper's protocol: train every split (x variants), report medians",
                       description="Train every split (and variant) of PROTOCOL.yaml as a search, then write the "
                                   "report: per dataset the median SRCC/PLCC over splits (see "
                                   "launch/configs/protocol_demo.yaml).")
    p.add_argument("--config", required=True, help="protocol file (YAML)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a protocol key")
    p.add_argument("--check", action="store_true", help=CHECK_HELP)
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    p.set_defaults(func=cmd_protocol)

    p = sub.add_parser("report", help="rebuild a search's results (and a protocol's report) from its folder")
    p.add_argument("dir", help="the experiment folder (STORAGE/NAME)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="evaluate a model on packed shard sets (SRCC/PLCC, scene/distortion accuracy)",
                       description="Evaluate the model a training config builds (e.g. pretrained CLIP, zero-shot), "
                                   "or a checkpoint, on shard sets; without --config, name the shard sets.")
    p.add_argument("shards", nargs="*", help="shard set folders (default: the config's datasets)")
    p.add_argument("--config", help="training config: model, datasets, crops, split")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--model", help="open_clip model name or project config (default ViT-B-32, or the config's)")
    p.add_argument("--checkpoint", help="weights file: project .safetensors, released LIQE .pt, pyiqa liqe_mix.pt")
    p.add_argument("--pretrained", help="open_clip pretrained tag (e.g. openai; downloaded by open_clip)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="default: the config's, or fp32")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--split", type=int, help="which of the ten splits (0-based; default: the config's, or 0)")
    p.add_argument("--part", choices=["train", "val", "test", "all"], default="test",
                   help="which part of the split; all: every image (cross-dataset evaluation)")
    p.add_argument("--out", help="write metrics.csv, predictions.csv, scatter.png, config.yaml and run.json here")
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("make-synthetic", help="write the synthetic demo dataset (images + labels.csv)")
    p.add_argument("out")
    p.add_argument("--references", type=int, help="use only the first N reference photographs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_make_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; an expected failure (bad file, bad config, unreadable weights or image) is
    one line naming what is wrong and exit code 2, its traceback only with ``--debug``."""
    from liqe_dist.config import ConfigError
    from liqe_dist.models.weights import CheckpointError
    from liqe_dist.data.images import ImageDecodeError

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose or args.debug)
    # A shell script's background command starts with SIGINT ignored (the SLURM scripts run it so);
    # restore Ctrl+C, so that SIGINT stops a search cleanly there too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:  # Ctrl+C; a search stopped by it says what is left (SearchInterrupted)
        log.error("interrupted%s", f": {exc}" if str(exc) else "")
        return 130
    except BrokenPipeError:  # the reader left (`liqe-dist score DIR | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 0
    except (ConfigError, CheckpointError, ImageDecodeError, OSError, ValueError) as exc:
        if args.debug:
            raise
        log.error("%s", _one_line(exc))
        return 2


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text.splitlines()[0] if "\n" in text else text



if __name__ == "__main__":
    sys.exit(main())
