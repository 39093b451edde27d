"""One trial of a search: a Tune function trainable that runs the same Ray Train TorchTrainer as
``liqe-dist train`` (Train V2: the trainable drives the trainer; ``Tuner(trainer)`` is gone).

The trial's run folder is Tune's trial folder (``EXPERIMENT/trial_00003``): checkpoints, logs,
plots and Tune's ``params.json``/``result.json`` side by side. Its name is the trial's number,
kept by a restored experiment, so a resumed trial finds its checkpoints and continues.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from liqe_dist.config import from_dict
from liqe_dist.tune.config import SearchConfig

# Reported per rank (wall-clock of that rank's step); everything else is computed over the
# global batch or gathered predictions and must agree on every rank: exactly for the evaluation
# (rank 0's criteria are broadcast), to RELATIVE_AGREEMENT for the loss each rank computes
# from the same gathered logits (summation order may differ in the last bits).
PER_RANK_METRICS = ("step_seconds", "images_per_second")
RELATIVE_AGREEMENT = 1e-9


def trial_name(trial) -> str:
    """``trial_00003``: the trial's number in the experiment (its id's counter), stable across restores."""
    return "trial_" + trial.trial_id.rsplit("_", 1)[-1]


def run_trial(params: dict[str, Any], search: dict, launch: dict | None = None) -> None:
    """Tune's entry point for a trial with sampled ``params`` (dotted keys, ``variant``). The
    run folder is the trial's folder in the experiment (``get_trial_dir`` would be a staging
    folder on this node, empty again when a restored trial restarts)."""
    from ray import tune

    from liqe_dist.run.ray_train import make_trainer
    from liqe_dist.train.state import check_resume

    search_cfg = from_dict(SearchConfig, search)
    cfg = dataclasses.replace(search_cfg.trial_config(params), out_dir=str(search_cfg.experiment_dir),
                              name=tune.get_context().get_trial_name())
    check_resume(cfg)  # a restored trial's checkpoints must be of this trial's config
    make_trainer(cfg, callbacks=[_all_ranks_report()], launch=launch).fit()


def agreed_metrics(per_rank: list[dict]) -> dict:
    """One report from every rank's: values that must agree are checked to (a rank that
    disagrees is a bug worth stopping for) and rank 0's is reported; per-rank timings are averaged."""
    out = dict(per_rank[0])
    for key, value in per_rank[0].items():
        values = [m.get(key) for m in per_rank]
        if key in PER_RANK_METRICS:
            out[key] = sum(values) / len(values)
        elif any(not _same(v, value) for v in values):
            raise RuntimeError(f"ranks reported different {key}: {values}")
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=RELATIVE_AGREEMENT, abs_tol=1e-12)
    return a == b


def _all_ranks_report():
    """Tune's TuneReportCallback forwards rank 0's metrics only; this one forwards the metrics
    all ranks agree on (:func:`agreed_metrics`)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class AllRanksReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [agreed_metrics(metrics)], checkpoint)

    return AllRanksReport()
