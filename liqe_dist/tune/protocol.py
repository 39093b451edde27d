"""The paper's evaluation protocol as a search: every split (x every variant) trained, then the
per-dataset **median** SRCC and PLCC over splits (the paper's statistic), with mean, std and the
per-split values (``liqe-dist protocol --config PROTOCOL.yaml``; ``liqe-dist report DIR`` rebuilds).

A trial's numbers are its test criteria at its best step by mean val SRCC (``best.json``): the
test part is never used to pick. Cross-dataset rows score each trial's best weights on other
datasets' whole sets (part ``all``), the paper's cross-dataset table.

    train: liqe_reference.yaml        # path (relative to this file) or the training keys
    splits: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    variants:                          # optional, e.g. the ablations (Tables 4/5)
      LIQE: {}
      w/o scene: {model.tasks: [quality, distortion]}
    cross_dataset: [shards/koniq10k]   # optional
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from liqe_dist.config import ConfigError, apply_overrides, from_dict, to_dict
from liqe_dist.files import atomic_path
from liqe_dist.data.packing import check_labelled_set
from liqe_dist.tune.config import (Distribution, SchedulerConfig, SearchConfig, check_experiment_folder, check_search,
                                   read_sections)
from liqe_dist.tune.results import SEARCH_FILE, trial_dirs

log = logging.getLogger("liqe_dist.tune")

PROTOCOL_FILE = "protocol.json"
CROSS_FILE = "cross_dataset.json"  # in a trial folder: {dataset: {"srcc", "plcc", "images"}}
CRITERIA = ("srcc", "plcc")


@dataclass(frozen=True)
class ProtocolConfig:
    train: dict[str, Any]
    splits: list[int] = field(default_factory=lambda: list(range(10)))
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    cross_dataset: list[str] = field(default_factory=list)
    max_concurrent_trials: int | None = None
    name: str = "protocol"
    storage: str = "runs/protocol"
    allow_large: bool = False  # more trials (splits x variants) than the search limit allows
    # Published figures to print beside ours: dataset -> {srcc, plcc} (e.g. the paper's table).
    published: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.splits or len(set(self.splits)) != len(self.splits) or not all(0 <= s < 10 for s in self.splits):
            raise ValueError(f"splits: expected distinct splits in 0..9, got {self.splits}")
        for dataset, values in self.published.items():
            bad = sorted(set(values) - set(CRITERIA))
            if bad or not values:
                raise ValueError(f"published.{dataset}: expected srcc and/or plcc, got {sorted(values)}")
        self.search()  # its name, storage and limits are the protocol's

    @property
    def selection(self) -> str:
        """The part whose mean SRCC each trial reports as its metric: ``train.selection``, else
        val when the trials evaluate it, else test (see :func:`selection_rule` for the step)."""
        return self.train.get("selection") or ("val" if "val" in self.train.get("eval_parts", ["val"]) else "test")

    def search(self) -> SearchConfig:
        """The search that runs the protocol: a grid over splits (x variants), every trial to the end."""
        return SearchConfig(train=self.train, search_space={"split": Distribution(grid=list(self.splits))},
                            variants=self.variants, metric=f"{self.selection}/mean_srcc",
                            scheduler=SchedulerConfig("fifo"),
                            max_concurrent_trials=self.max_concurrent_trials, name=self.name, storage=self.storage,
                            allow_large=self.allow_large)


def load_protocol(path: str | Path, overrides: dict[str, Any] | None = None) -> ProtocolConfig:
    """Read a protocol file and check it as its search (:func:`check_search`, the experiment
    folder) with its cross-dataset sets: each a packed set with MOS, as scoring it needs."""
    path = Path(path)
    data = apply_overrides(read_sections(path), overrides or {})
    try:
        protocol = from_dict(ProtocolConfig, data)
        check_search(protocol.search())
        check_experiment_folder(protocol.search())
        for i, shards in enumerate(protocol.cross_dataset):
            check_labelled_set(shards, f"cross_dataset[{i}]")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return protocol


def run_protocol(protocol: ProtocolConfig, address: str | None = None) -> Path:
    """Train every split (x variant), score the cross-dataset sets, write the report; returns report.md."""
    from liqe_dist.tune.search import run_search

    search = protocol.search()
    run_search(search, address=address)
    with atomic_path(search.experiment_dir / PROTOCOL_FILE) as tmp:
        tmp.write_text(json.dumps(json.loads(json.dumps(to_dict(protocol))), indent=1))
    if protocol.cross_dataset:
        score_cross_dataset(protocol)
    return write_report(search.experiment_dir)


def score_cross_dataset(protocol: ProtocolConfig) -> None:
    """Score every trial's best weights on each cross-dataset set's whole set (once per trial)."""
    from liqe_dist.eval.scoring import describe_run
    from liqe_dist.eval.shard_eval import evaluate_shards
    from liqe_dist.models.weights import load_weights

    search = protocol.search()
    for trial_dir in trial_dirs(search.experiment_dir):
        out, weights = trial_dir / CROSS_FILE, trial_dir / "best.safetensors"
        if out.exists() or not weights.exists():
            continue
        params = json.loads((trial_dir / "params.json").read_text())
        cfg = search.trial_config(params)
        model = load_weights(weights)
        log.info("%s: cross-dataset scoring: %s", trial_dir.name, describe_run(model, model.device, cfg.crops,
                                                                              cfg.eval_batch))
        scores = {}
        for shards in protocol.cross_dataset:
            for name, ev in evaluate_shards(model, [shards], 0, "all", cfg.crops, cfg.eval_batch,
                                            progress=False).items():
                scores[name] = {"srcc": ev.quality.srcc, "plcc": ev.quality.plcc, "images": ev.quality.n}
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(scores, indent=1))
        log.info("%s (%s): cross-dataset %s", trial_dir.name, params,
                 ", ".join(f"{k} SRCC {v['srcc']:.3f}" for k, v in scores.items()))


def split_values(experiment_dir: Path) -> dict[tuple[str, str, str], dict[int, float]]:
    """``{(variant, dataset, criterion): {split: value}}`` from the trials' ``best.json`` (test part)
    and ``cross_dataset.json`` (datasets marked ``→ NAME``). Without variants the row is named
    after the training config (``train.name``)."""
    out: dict[tuple[str, str, str], dict[int, float]] = {}
    search_file = Path(experiment_dir) / SEARCH_FILE
    default = json.loads(search_file.read_text()).get("train", {}).get("name", "model") if search_file.exists() \
        else "model"
    for trial_dir in trial_dirs(Path(experiment_dir)):
        params_path = trial_dir / "params.json"
        if not params_path.exists():
            continue
        params = json.loads(params_path.read_text())
        variant, split = params.get("variant", default), int(params["split"])
        best = trial_dir / "best.json"
        if best.exists():
            for key, value in json.loads(best.read_text()).items():
                parts = key.split("/")
                if len(parts) == 3 and parts[0] == "test" and parts[2] in CRITERIA:
                    out.setdefault((variant, parts[1], parts[2]), {})[split] = float(value)
        cross = trial_dir / CROSS_FILE
        if cross.exists():
            for dataset, values in json.loads(cross.read_text()).items():
                for c in CRITERIA:
                    out.setdefault((variant, f"→ {dataset}", c), {})[split] = float(values[c])
    return out


def summarise(values: dict[int, float]) -> dict[str, Any]:
    v = np.array([values[s] for s in sorted(values)], dtype=float)
    ok = v[~np.isnan(v)]
    nan = float("nan")
    return {"median": float(np.median(ok)) if ok.size else nan, "mean": float(ok.mean()) if ok.size else nan,
            "std": float(ok.std(ddof=1)) if ok.size > 1 else nan, "splits": len(values),
            "values": ";".join(f"{s}:{values[s]:.4f}" for s in sorted(values))}


def selection_rule(train: dict) -> str:
    """How a trial's reported step was chosen, in words, from its training keys (as
    :class:`~liqe_dist.train.config.TrainConfig` does: ``selection``, else val when evaluated,
    else the latest evaluated step)."""
    part = train.get("selection") or ("val" if "val" in train.get("eval_parts", ["val"]) else None)
    return f"the best {part} step" if part else "the last evaluated step"


def write_report(experiment_dir: str | Path) -> Path:
    """``report.csv`` (variant, dataset, criterion, median, mean, std, splits, per-split values)
    and ``report.md`` (Table 2 layout: datasets as columns, SRCC / PLCC medians; variants as
    rows, the ablation tables' layout; cross-dataset sets marked ``→``); returns report.md."""
    exp = Path(experiment_dir)
    values = split_values(exp)
    rows = [{"variant": v, "dataset": d, "criterion": c, **summarise(vals)} for (v, d, c), vals in values.items()]
    with atomic_path(exp / "report.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "dataset", "criterion", "median", "mean", "std", "splits",
                                          "values"])
        w.writeheader()
        w.writerows(rows)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    within = sorted({r["dataset"] for r in rows if not r["dataset"].startswith("→")})
    cross = sorted({r["dataset"] for r in rows if r["dataset"].startswith("→")})
    cell = {(r["variant"], r["dataset"], r["criterion"]): r for r in rows}

    def table(datasets: list[str]) -> list[str]:
        lines = ["| | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
        for v in variants:
            cells = []
            for d in datasets:
                s, p = cell.get((v, d, "srcc")), cell.get((v, d, "plcc"))
                cells.append("–" if s is None else f"{_fmt(s['median'])} / {_fmt(p['median'] if p else math.nan)}")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        return lines

    protocol_file = exp / PROTOCOL_FILE
    protocol = json.loads(protocol_file.read_text()) if protocol_file.exists() else {}
    selection = selection_rule(protocol.get("train", {}))
    published = protocol.get("published") or {}
    n = max((r["splits"] for r in rows), default=0)
    md = [f"# {exp.name}: median SRCC / PLCC over {n} split(s) (test part, at {selection})", ""]
    if selection == "the best test step":
        md += ["Each split's figure is its best test-part step (as the PMT-IQA public code reports): the test part "
               "picked the step it reports, so these figures are optimistic against val selection.", ""]
    md += table(within)
    if published:
        md.append("| published | " + " | ".join(
            " / ".join(_fmt(published.get(d, {}).get(c, math.nan)) for c in CRITERIA) for d in within) + " |")
    if cross:
        md += ["", "## Cross-dataset: trained on the datasets above, scored on whole sets", ""] + table(cross)
    md += ["", "## Per dataset: median, mean ± std, per-split values", "",
           "| variant | dataset | criterion | median | mean ± std | splits |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['dataset']} | {r['criterion']} | {_fmt(r['median'])} | "
                  f"{_fmt(r['mean'])} ± {_fmt(r['std'])} | {r['values']} |")
    path = exp / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    return path


def _fmt(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.3f}"
