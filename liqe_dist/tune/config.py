"""The typed configuration of a search (``liqe-dist tune --config SEARCH.yaml``).

A search file names a training config (``train:``, a path relative to the search file, or the
training keys inline) and the keys to search, dotted as in ``--set``::

    train: demo.yaml
    search_space:
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
      optim.weight_decay: {grid: [0.0, 1.0e-3]}
    variants:                       # optional: named groups of keys, searched as a grid
      no-scene: {model.tasks: [quality, distortion]}
    num_samples: 2                  # draws of the random keys per grid point
    metric: val/mean_srcc
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}

Every value a trial can take is checked against the training config at start (unknown key,
wrong type, value out of range), and the metric against what training reports.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from liqe_dist.config import ConfigError, apply_overrides, flatten, from_dict, merge, read_yaml, to_dict
from liqe_dist.train.config import TrainConfig

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Distribution:
    """Exactly one of: ``grid`` (every value, a Cartesian product with the other grids),
    ``choice`` (one value at random), ``uniform``/``loguniform`` ``[low, high]`` (floats),
    ``randint`` ``[low, high)`` (integers)."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: list[float] | None = None
    loguniform: list[float] | None = None
    randint: list[int] | None = None

    def __post_init__(self) -> None:
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of {', '.join(DISTRIBUTIONS)}, got {given or 'none'}")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice"):
            if not values:
                raise ValueError(f"{given[0]}: expected at least one value")
            return
        if len(values) != 2 or not values[0] < values[1]:
            raise ValueError(f"{given[0]}: expected [low, high] with low < high, got {values}")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {values[0]}")

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def args(self) -> list:
        return getattr(self, self.kind)

    def probes(self) -> list:
        """Values that stand for every value a trial can take (all listed ones, or the bounds)."""
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def to_tune(self):
        from ray import tune

        kind = {"grid": tune.grid_search, "choice": tune.choice}.get(self.kind)
        if kind is not None:
            return kind(list(self.args))
        return getattr(tune, self.kind)(*self.args)


@dataclass(frozen=True)
class SchedulerConfig:
    """``fifo``: every trial runs to the end. ``asha``: asynchronous successive halving, a trial
    below the best 1/``reduction_factor`` at a rung (``grace_period`` x ``reduction_factor``^k
    epochs) stops. ``pbt`` is refused: it pauses and resumes trials, which a Train V2 trial
    (a trainable that drives a TorchTrainer) cannot do."""

    kind: Literal["fifo", "asha", "pbt"] = "fifo"
    grace_period: int = 1          # epochs before ASHA may stop a trial
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.kind == "pbt":
            raise ValueError("kind: pbt (population-based training) pauses trials and resumes them with changed "
                             "hyper-parameters; a Ray Train V2 trial cannot be paused. Use asha or fifo")
        if self.grace_period < 1:
            raise ValueError(f"grace_period must be >= 1 epoch, got {self.grace_period}")
        if not self.reduction_factor > 1:
            raise ValueError(f"reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class SearchConfig:
    """A search over a training config; see the module docstring."""

    train: dict[str, Any]                        # the training config's keys (a path is read by load_search)
    search_space: dict[str, Distribution] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_samples: int = 1
    metric: str = "val/mean_srcc"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search_alg: Literal["basic", "optuna"] = "basic"
    max_concurrent_trials: int | None = None     # None: as many as the cluster's CPUs (GPUs) hold
    seed: int = 0                                # of the random draws
    name: str = "search"
    storage: str = "runs/tune"

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(f"max_concurrent_trials must be >= 1, got {self.max_concurrent_trials}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name: expected a folder name, got {self.name!r}")
        if not (self.search_space or self.variants):
            raise ValueError("search_space: nothing to search (give search_space or variants)")
        clash = sorted(set(self.search_space) & {k for v in self.variants.values() for k in v})
        if clash:
            raise ValueError(f"search_space: {clash[0]} is set by a variant too")
        if self.search_alg == "optuna" and any(d.kind == "grid" for d in self.search_space.values()):
            raise ValueError("search_alg optuna samples every key; use choice instead of grid")

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage).resolve() / self.name

    def trial_overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """The dotted keys one trial sets: its sampled values, then its variant's keys."""
        out = {k: v for k, v in params.items() if k != "variant"}
        if "variant" in params:
            out.update(self.variants[params["variant"]])
        return out

    def trial_config(self, params: dict[str, Any]) -> TrainConfig:
        """The full training config of a trial with sampled ``params`` (``{"optim.lr": ..., "variant": ...}``)."""
        return from_dict(TrainConfig, apply_overrides(self.train, self.trial_overrides(params)))


def read_sections(path: Path) -> dict:
    """A search or protocol file with its ``train:`` and ``variants:`` read in: ``train`` a path
    (relative to the file), or keys with an optional ``base:`` path; a variant a mapping of
    dotted keys, or a training config file whose keys replace the base's (an ablation config)."""
    data = read_yaml(path)
    train = data.get("train")
    if isinstance(train, str):
        data["train"] = read_yaml(path.parent / train)
    elif isinstance(train, dict) and isinstance(train.get("base"), str):
        data["train"] = merge(read_yaml(path.parent / train["base"]), {k: v for k, v in train.items() if k != "base"})
    elif not isinstance(train, dict):
        raise ConfigError(f"{path}: train: expected the training config (a file path or its keys)")
    variants = data.get("variants")
    if isinstance(variants, dict):
        data["variants"] = {name: flatten(read_yaml(path.parent / v)) if isinstance(v, str) else v
                            for name, v in variants.items()}
    return data


def load_search(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchConfig:
    """Read a search file (:func:`read_sections`), apply ``overrides`` (``train.epochs=2``,
    ``num_samples=4``) and check every trial's config (:func:`check_search`)."""
    path = Path(path)
    data = apply_overrides(read_sections(path), overrides or {})
    try:
        search = from_dict(SearchConfig, data)
        check_search(search)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return search


def check_search(search: SearchConfig) -> TrainConfig:
    """Build the training config of every probe value of every key (each key alone, every
    variant alone): an unknown key or an impossible value fails here, named. Returns the base
    config; checks that the metric is one training reports."""
    try:
        base = from_dict(TrainConfig, search.train)
    except ConfigError as exc:
        raise ConfigError(f"train: {exc}") from None
    for key, dist in search.search_space.items():
        if key == "variant":
            raise ConfigError("search_space.variant: reserved for the variants: list")
        for value in dist.probes():
            try:
                from_dict(TrainConfig, apply_overrides(search.train, {key: value}))
            except ConfigError as exc:
                raise ConfigError(f"search_space.{key} = {value!r}: {exc}") from None
    for name, keys in search.variants.items():
        try:
            from_dict(TrainConfig, apply_overrides(search.train, keys))
        except ConfigError as exc:
            raise ConfigError(f"variants.{name}: {exc}") from None
    for params in corner_trials(search):  # keys together (e.g. crops.size with model.name)
        try:
            search.trial_config(params)
        except ConfigError as exc:
            raise ConfigError(f"search_space: the trial {params} is impossible: {exc}") from None
    if search.search_alg == "optuna":
        try:
            import optuna  # noqa: F401  (Tune's OptunaSearch imports it only when the search starts)
        except ImportError:
            raise ConfigError("search_alg: optuna is not installed (pip install 'liqe-dist[optuna]'), "
                              "or use search_alg: basic") from None
    reported = reported_metrics(base)
    for variant in search.variants.values():
        reported |= reported_metrics(from_dict(TrainConfig, apply_overrides(search.train, variant)))
    if search.metric not in reported:
        raise ConfigError(f"metric: training does not report {search.metric!r} (it reports "
                          f"{', '.join(sorted(k for k in reported if '/' in k and k.count('/') < 2))}, ...)")
    return base


def corner_trials(search: SearchConfig, limit: int = 64) -> list[dict[str, Any]]:
    """Up to ``limit`` combinations of every key's probe values (and every variant)."""
    keys = list(search.search_space)
    values = [search.search_space[k].probes() for k in keys]
    if search.variants:
        keys.append("variant")
        values.append(list(search.variants))
    return [dict(zip(keys, combo)) for combo in itertools.islice(itertools.product(*values), limit)]


def reported_metrics(cfg: TrainConfig) -> set[str]:
    """The metric names a run of ``cfg`` reports (``val/mean_srcc``, ``test/NAME/plcc``, ``loss``, ...)."""
    tasks = cfg.model.loss_tasks
    out = {"loss", "lr", "step_seconds", "images_per_second", "skipped_samples"}
    out |= {f"loss/{t}" for t in tasks} | {f"lambda/{t}" for t in tasks}
    criteria = ["srcc", "plcc"] + [f"{t}_acc" for t in ("scene", "distortion") if t in tasks]
    for part in cfg.eval_parts:
        out.add(f"{part}/mean_srcc")
        out |= {f"{part}/{d.name}/{c}" for d in cfg.datasets for c in criteria}
    return out


def describe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (a restored search's check)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_changes(a, b, dotted + ".")
        elif a != b:
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def search_dict(search: SearchConfig) -> dict:
    """The search as plain data (saved in the experiment folder, compared on restore)."""
    import json

    return json.loads(json.dumps(to_dict(search)))

