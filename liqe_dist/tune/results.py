"""A search's results, read back from its trial folders (so ``liqe-dist report`` can rebuild them).

``results.csv``: one row per trial (its searched values, status, epochs run, best step, the
metric, and the val/test criteria at the best step by mean val SRCC, from the run's
``best.json``); ``results.md``: the same sorted by the metric; ``best.yaml``: the best trial's
whole training config, ready for ``liqe-dist train``; ``search.png``: the metric per trial over
epochs, and against each searched key.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import yaml

from liqe_dist.files import atomic_path
from liqe_dist.tune.config import SearchConfig

SEARCH_FILE = "search.json"  # the search an experiment folder was started with
TRIAL_STATUS = "trial.json"  # written into a trial's folder when it ends: {"status": ..., "epoch": ...}


def trial_dirs(experiment_dir: Path) -> list[Path]:
    return sorted(p for p in Path(experiment_dir).glob("trial_*") if p.is_dir())


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def trial_metric(trial_dir: Path, metric: str) -> float:
    """The trial's value of ``metric``: at its best step (by mean val SRCC) when it is an
    evaluation criterion, else the last reported value."""
    best = _best(trial_dir)
    if metric in best:
        return _float(best[metric])
    for name in ("eval.csv", "steps.csv"):
        rows = read_csv(trial_dir / name)
        if rows and metric in rows[-1]:
            return _float(rows[-1][metric])
    return math.nan


def _best(trial_dir: Path) -> dict:
    path = trial_dir / "best.json"
    return json.loads(path.read_text()) if path.exists() else {}


def trial_row(search: SearchConfig, trial_dir: Path) -> dict:
    """One row of ``results.csv``."""
    params_path = trial_dir / "params.json"
    params = json.loads(params_path.read_text()) if params_path.exists() else {}
    status_path = trial_dir / TRIAL_STATUS
    status = json.loads(status_path.read_text())["status"] if status_path.exists() else "unfinished"
    evals = read_csv(trial_dir / "eval.csv")
    best = _best(trial_dir)
    row = {"trial": trial_dir.name, "status": status, **{k: params.get(k) for k in _param_keys(search)},
           "epochs": int(_float(evals[-1]["epoch"])) if evals and evals[-1].get("epoch") else 0,
           "best_step": best.get("step"), search.metric: trial_metric(trial_dir, search.metric)}
    row.update({k: v for k, v in best.items() if k != "step" and k != search.metric})
    return row


def _param_keys(search: SearchConfig) -> list[str]:
    return list(search.search_space) + (["variant"] if search.variants else [])


def sort_rows(rows: list[dict], metric: str, mode: str) -> list[dict]:
    """Best first; trials without a value last."""
    def key(r):
        v = _float(r.get(metric))
        return (math.isnan(v), -v if mode == "max" else v)

    return sorted(rows, key=key)


def collect(search: SearchConfig) -> list[dict]:
    return sort_rows([trial_row(search, d) for d in trial_dirs(search.experiment_dir)], search.metric, search.mode)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.4g}"
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def summary_columns(search: SearchConfig) -> list[str]:
    extra = [c for c in ("val/mean_srcc", "test/mean_srcc") if c != search.metric]
    return ["trial", "status", *_param_keys(search), "epochs", "best_step", search.metric, *extra]


def write_results(search: SearchConfig) -> list[dict]:
    """Write results.csv, results.md, best.yaml and search.png; returns the rows, best first."""
    exp = search.experiment_dir
    rows = collect(search)
    columns = summary_columns(search)
    columns += sorted({k for r in rows for k in r} - set(columns))
    with atomic_path(exp / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    with atomic_path(exp / "results.md") as tmp:
        tmp.write_text(f"# {search.name}: trials by {search.metric} ({search.mode})\n\n"
                       + markdown_table(rows, summary_columns(search)) + "\n")
    if rows and not math.isnan(_float(rows[0][search.metric])):
        write_best_config(search, rows[0])
    plot_search(search, rows)
    return rows


def write_best_config(search: SearchConfig, row: dict) -> Path:
    """``best.yaml``: the best trial's full training config (its own run name, default out_dir)."""
    from liqe_dist.config import to_dict

    params = json.loads((search.experiment_dir / row["trial"] / "params.json").read_text())
    data = json.loads(json.dumps(to_dict(search.trial_config(params))))  # tuples -> lists for YAML
    data["name"], data["out_dir"] = f"{search.name}-best", "runs/train"
    path = search.experiment_dir / "best.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(f"# best trial of search {search.name}: {row['trial']} ({search.metric} "
                       f"{_float(row[search.metric]):.4f})\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def plot_search(search: SearchConfig, rows: list[dict]) -> None:
    """``search.png``: the metric per trial over epochs, and against each searched key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _param_keys(search)
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(5 * (1 + len(keys)), 4), squeeze=False)
    curves = axes[0][0]
    for row in sorted(rows, key=lambda r: r["trial"]):
        source = "eval.csv" if search.metric.startswith(("val/", "test/")) else "steps.csv"
        points = [(_float(r.get("epoch")), _float(r.get(search.metric)))
                  for r in read_csv(search.experiment_dir / row["trial"] / source)]
        if points:
            curves.plot(*zip(*points), marker="o", label=f"{row['trial']} ({row['status']})")
    curves.set(xlabel="epoch", ylabel=search.metric, title=f"{search.name}: {search.metric} per trial")
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=7)
    for ax, key in zip(axes[0][1:], keys):
        xs, ys = [r.get(key) for r in rows], [_float(r.get(search.metric)) for r in rows]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:
            labels = sorted({str(x) for x in xs})
            xs = [labels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.scatter(xs, ys)
        dist = search.search_space.get(key)
        if dist is not None and dist.kind == "loguniform":
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=search.metric, title=f"{search.metric} vs {key}")
    fig.tight_layout()
    fig.savefig(search.experiment_dir / "search.png", dpi=110)
    plt.close(fig)
