"""Running a search: Ray Tune over trials that are each a multi-worker DeepSpeed training.

``run_search`` starts (or joins) the cluster, restores the experiment when its folder holds one
(the same command after the driver died: finished trials are kept, unfinished ones resume from
their newest checkpoint), runs the trials with at most ``max_concurrent_trials`` at a time,
removes each ended trial's placement group, and writes the results (:mod:`liqe_dist.tune.results`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from ray.tune import Callback

from liqe_dist.config import ConfigError, describe_changes
from liqe_dist.files import atomic_path
from liqe_dist.provenance import launch, write_config, write_run_record
from liqe_dist.tune.cleanup import experiment_groups, live_groups, remove_groups
from liqe_dist.outputs import claim_dir
from liqe_dist.tune.config import EXPERIMENT_KIND, SearchConfig, asha_max_t, corner_trials, search_dict
from liqe_dist.tune.results import SEARCH_FILE, TRIAL_STATUS, trial_dirs, write_results
from liqe_dist.tune.trial import run_trial, trial_name

log = logging.getLogger("liqe_dist.tune")


def trial_resources(search: SearchConfig) -> tuple[float, float]:
    """(CPUs, GPUs) one trial's workers take: the most any of its trials asks for."""
    cfgs = [search.trial_config(p) for p in corner_trials(search)] or [search.trial_config({})]
    cpus = max(c.workers * c.resolved_cpus_per_worker for c in cfgs)
    gpus = max(c.workers if c.use_gpu else 0 for c in cfgs)
    return cpus, gpus


def concurrent_trials(search: SearchConfig, cluster: dict[str, float]) -> int:
    """``max_concurrent_trials``, or as many trials as the cluster's CPUs (and GPUs) hold, one CPU
    kept for the trials' drivers and controllers."""
    if search.max_concurrent_trials is not None:
        return search.max_concurrent_trials
    cpus, gpus = trial_resources(search)
    fit = math.floor((cluster.get("CPU", 0) - 1) / cpus)
    if gpus:
        fit = min(fit, math.floor(cluster.get("GPU", 0) / gpus))
    return max(1, fit)


def _scheduler(search: SearchConfig):
    if search.scheduler.kind == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = asha_max_t([search.trial_config(p) for p in corner_trials(search)])  # what --check checked
    return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=search.scheduler.grace_period,
                         reduction_factor=search.scheduler.reduction_factor)


def _search_alg(search: SearchConfig, concurrency: int):
    if search.search_alg == "basic":
        from ray.tune.search import BasicVariantGenerator

        # Tune ignores TuneConfig.max_concurrent_trials for a variant generator given as an object
        return BasicVariantGenerator(random_state=search.seed, max_concurrent=concurrency)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=search.seed)


def param_space(search: SearchConfig) -> dict:
    """Tune's parameter space: one entry per dotted key, plus ``variant`` (a grid over the
    variants' names; a choice under Optuna)."""
    from ray import tune

    space = {key: dist.to_tune() for key, dist in search.search_space.items()}
    if search.variants:
        names = list(search.variants)
        space["variant"] = tune.choice(names) if search.search_alg == "optuna" else tune.grid_search(names)
    return space


def check_experiment(search: SearchConfig) -> bool:
    """Whether the experiment folder holds this search already (then it is restored); a folder
    started with another search is an error naming what differs."""
    saved = search.experiment_dir / SEARCH_FILE
    if not saved.exists():
        return False
    changes = describe_changes(json.loads(saved.read_text()), search_dict(search))
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise ConfigError(f"{search.experiment_dir} holds a search with other settings ({shown}): give this one "
                          f"another name (--set name=...) or remove that folder")
    return True


def with_absolute_paths(search: SearchConfig) -> SearchConfig:
    """``search`` with its storage and shard sets as absolute paths, the training config's and
    those of variants that set ``datasets`` (trials run in other folders)."""
    import dataclasses

    def absolute(datasets):
        if not isinstance(datasets, list):
            return datasets
        return [{**d, "shards": str(Path(d["shards"]).resolve())}
                if isinstance(d, dict) and isinstance(d.get("shards"), str) else d for d in datasets]

    train = dict(search.train)
    if "datasets" in train:
        train["datasets"] = absolute(train["datasets"])
    variants = {name: {**keys, "datasets": absolute(keys["datasets"])} if "datasets" in keys else keys
                for name, keys in search.variants.items()}
    return dataclasses.replace(search, train=train, variants=variants, storage=str(Path(search.storage).resolve()))


def run_search(search: SearchConfig, address: str | None = None) -> list[dict]:
    """Run (or resume) ``search``; returns the results' rows (best first) and writes them."""
    from ray import tune

    from liqe_dist.run.ray_train import connect

    # Tune's console output (a boxed header, trial tables) gives way to TrialProgress's lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    search = with_absolute_paths(search)
    exp = search.experiment_dir
    restoring = check_experiment(search)
    per_trial, _ = trial_resources(search)
    wanted = search.max_concurrent_trials or 1
    connect(address, wanted * per_trial + 1)
    import ray

    concurrency = concurrent_trials(search, ray.cluster_resources())
    claim_dir(exp, EXPERIMENT_KIND, what="the experiment folder", legacy=lambda p: (p / SEARCH_FILE).exists())
    with atomic_path(exp / SEARCH_FILE) as tmp:
        tmp.write_text(json.dumps(search_dict(search), indent=1))
    write_config(exp, search_dict(search))  # each trial's folder records its own training config
    write_run_record(exp, trials_at_a_time=concurrency, resumed=bool(restoring))
    trainable = tune.with_resources(tune.with_parameters(run_trial, search=search_dict(search), launch=launch()),
                                    {"CPU": 0.01})
    if restoring and tune.Tuner.can_restore(str(exp)):
        log.info("resuming %s: finished trials are kept, unfinished ones continue from their checkpoints", exp)
        tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space(search))
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space(search),
            tune_config=tune.TuneConfig(metric=search.metric, mode=search.mode, num_samples=search.num_samples,
                                        scheduler=_scheduler(search), search_alg=_search_alg(search, concurrency),
                                        max_concurrent_trials=None if search.search_alg == "basic" else concurrency,
                                        trial_name_creator=trial_name,
                                        trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=search.name, storage_path=str(exp.parent), verbose=0,
                                      callbacks=[TrialProgress(search)]))
    log.info("search %s: %s trial(s) at a time, %g CPU(s) each; trial folders in %s", search.name, concurrency,
             per_trial, exp)
    try:
        tuner.fit()
    finally:
        for trial_dir in trial_dirs(exp):
            remove_groups(trial_dir)
    left = live_groups(experiment_groups(exp))
    if left:
        raise RuntimeError(f"placement groups of {exp} still alive after the search: {sorted(left)}")
    return ensure_finished(search.name, write_results(search))


class SearchInterrupted(KeyboardInterrupt):
    """A search that Tune stopped before its end (its state is saved: running it again resumes)."""


def ensure_finished(name: str, rows: list[dict]) -> list[dict]:
    """``rows`` when every trial ended; else SearchInterrupted naming the unfinished ones (Tune
    returns normally after SIGINT: Ctrl+C, a SLURM job near its time limit)."""
    unfinished = [r["trial"] for r in rows if r["status"] == "unfinished"]
    if unfinished:
        raise SearchInterrupted(f"search {name} stopped with {len(unfinished)} trial(s) unfinished "
                                f"({', '.join(unfinished)}); the same command resumes it")
    return rows


class TrialProgress(Callback):
    """Console lines for a search (Tune's own tables are off): a trial's start with its values,
    each evaluation with the best so far, its end (finished, stopped early, failed). When a
    trial ends it writes ``trial.json`` (its status) and removes the trial's placement groups."""

    def __init__(self, search: SearchConfig):
        self.metric, self.mode = search.metric, search.mode
        self.search = search
        self.experiment_dir = search.experiment_dir
        self.best: tuple[float, str] | None = None

    def _counts(self, trials) -> str:
        states = [t.status for t in trials]
        return (f"{states.count('RUNNING')} running, {states.count('PENDING')} pending, "
                f"{states.count('TERMINATED')} ended, {states.count('ERROR')} failed")

    def _values(self, trial) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())

    def on_trial_start(self, iteration, trials, trial, **info):
        log.info("%s started: %s", trial_name(trial), self._values(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
        if better:
            self.best = (value, trial_name(trial))
        epochs = self._epochs(trial)
        log.info("%s epoch %s%s: %s %.4f | best %.4f (%s) | %s", trial_name(trial), result.get("epoch", "?"),
                 f"/{epochs}" if epochs else "", self.metric, value, self.best[0], self.best[1], self._counts(trials))

    def _epochs(self, trial) -> int | None:
        try:
            return self.search.trial_config(trial.config).epochs
        except Exception:
            return None

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs, done = self._epochs(trial), (trial.last_result or {}).get("epoch")
        stopped = epochs is not None and done is not None and done < epochs
        status = "stopped early" if stopped else "finished"
        self._ended(trial, status, f"at epoch {done}" if stopped else "")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "failed", f"see {self.experiment_dir / trial_name(trial) / 'error.txt'}")

    def _ended(self, trial, status: str, detail: str) -> None:
        trial_dir = self.experiment_dir / trial_name(trial)
        removed = remove_groups(trial_dir)  # before the next trial asks for its CPUs
        with atomic_path(trial_dir / TRIAL_STATUS) as tmp:
            tmp.write_text(json.dumps({"status": status, "epoch": (trial.last_result or {}).get("epoch")}))
        log.info("%s %s%s%s", trial_name(trial), status, f" {detail}" if detail else "",
                 " (removed its placement group)" if removed else "")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
