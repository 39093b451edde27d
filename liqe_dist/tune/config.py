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
wrong type, value out of range), and the metric against what training reports; so is everything
else that would fail only once Ray runs (the scheduler against the epochs, the seed, the name,
an experiment folder holding another search). A search of more than MAX_TRIALS trials, or a key
with more than MAX_VALUES values, needs ``allow_large: true``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Literal

from liqe_dist.config import TAG, ConfigError, _check, apply_overrides, flatten, from_dict, merge, read_yaml, to_dict
from liqe_dist.outputs import OutputError, check_claim, plain_name
from liqe_dist.train.config import TrainConfig

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
MAX_TRIALS = 10_000      # more trials in one search need allow_large: true
MAX_VALUES = 10_000      # more values of one grid or choice likewise
MAX_SEED = 2 ** 32 - 1   # Optuna's sampler seeds numpy's RandomState, which takes no larger seed
CORNER_TRIALS = 64       # combinations of the keys' probe values checked together


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
    allow_large: bool = False                    # more than MAX_TRIALS trials (not saved with the search)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(f"max_concurrent_trials must be >= 1, got {self.max_concurrent_trials}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be 0..{MAX_SEED} (2**32 - 1), got {self.seed}")
        check_folder_keys(self.name, self.storage)
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
        return validate_trial(self.train, self.trial_overrides(params))

    def trial_count(self) -> int:
        """How many trials Tune makes: ``num_samples`` x every grid x the variants (a grid too,
        except under Optuna, which draws them)."""
        grids = [len(d.args) for d in self.search_space.values() if d.kind == "grid"]
        if self.variants and self.search_alg == "basic":
            grids.append(len(self.variants))
        return self.num_samples * math.prod(grids)


def check_folder_keys(name: str, storage: str) -> None:
    """``name`` is one plain folder name (no separator, control character or leading dot, at
    most 200 bytes) and ``storage`` a usable path: the experiment folder is STORAGE/NAME."""
    plain_name(name, "name")
    if name.startswith("."):
        raise ValueError(f"name: expected a folder name, got {name!r}")
    if not storage or "\0" in storage:
        raise ValueError(f"storage: expected a folder path, got {storage!r}")


def validate_trial(train: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """One full validation: the training config ``train`` with the dotted ``overrides`` set."""
    return from_dict(TrainConfig, apply_overrides(train, overrides))


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
    ``num_samples=4``) and check it (:func:`check_search`, :func:`check_experiment_folder`)."""
    path = Path(path)
    data = apply_overrides(read_sections(path), overrides or {})
    try:
        search = from_dict(SearchConfig, data)
        check_search(search)
        check_experiment_folder(search)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return search


EXPERIMENT_KIND = "tune"  # the owner of an experiment folder (a search's or a protocol's)


def check_experiment_folder(search: SearchConfig) -> None:
    """STORAGE/NAME can take ``search``: a new folder, or one started with this same search
    (then resumed). A file there, or a folder holding another search, is refused now rather
    than once Ray runs; the comparison is the one the search makes before it starts."""
    from liqe_dist.tune.results import SEARCH_FILE
    from liqe_dist.tune.search import check_experiment, with_absolute_paths

    search = with_absolute_paths(search)
    exp = search.experiment_dir
    try:
        check_claim(exp, EXPERIMENT_KIND, what="the experiment folder", legacy=lambda p: (p / SEARCH_FILE).exists())
    except OutputError as exc:
        raise ConfigError(f"name: {exc}") from None
    saved = exp / SEARCH_FILE
    if saved.exists():
        try:
            data = json.loads(saved.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"name: {saved} is unreadable ({exc}); give this search another name") from None
        if not isinstance(data, dict):
            raise ConfigError(f"name: {saved} is not a saved search; give this search another name")
    try:
        check_experiment(search)
    except ConfigError as exc:
        raise ConfigError(f"name: {exc}") from None


def trial_shard_sets(search: SearchConfig) -> dict[str, str]:
    """Every shard set a trial can read, under the key that names it: the base config's, each
    variant's, and those of searched ``datasets`` values (each set once)."""
    found: dict[str, str] = {}

    def add(where: str, cfg: TrainConfig) -> None:
        for i, d in enumerate(cfg.datasets):
            found.setdefault(d.shards, f"{where}datasets[{i}].shards")

    add("train.", search.trial_config({}))
    for name in search.variants:
        add(f"variants.{name}.", search.trial_config({"variant": name}))
    for key, dist in search.search_space.items():
        if key == "datasets":
            for i, value in enumerate(dist.probes()):
                add(f"search_space.datasets.{dist.kind}[{i}]: ", validate_trial(search.train, {key: value}))
    return {key: shards for shards, key in found.items()}


def check_search(search: SearchConfig) -> TrainConfig:
    """Everything about ``search`` that could fail once Ray runs, checked now with the key named:
    every value a key can take (each key alone, every variant alone, the keys' probe values
    together), the size, the scheduler against the epochs, the search algorithm, the metric.
    Returns the base training config."""
    try:
        base = validate_trial(search.train, {})
    except ConfigError as exc:
        raise ConfigError(f"train: {exc}") from None
    check_size(search)
    for key, dist in search.search_space.items():
        if key == "variant":
            raise ConfigError("search_space.variant: reserved for the variants: list")
        KeyValues(search.train, key, base).check(dist.probes())
    variants = {}
    for name, keys in search.variants.items():
        try:
            variants[name] = validate_trial(search.train, keys)
        except ConfigError as exc:
            raise ConfigError(f"variants.{name}: {exc}") from None
    corners = []
    for params in corner_trials(search):  # keys together (e.g. crops.size with model.name)
        try:
            corners.append(search.trial_config(params))
        except ConfigError as exc:
            raise ConfigError(f"search_space: the trial {params} is impossible: {exc}") from None
    check_scheduler(search, corners or [base])
    check_search_alg(search)
    reported = reported_metrics(base)
    for cfg in variants.values():
        reported |= reported_metrics(cfg)
    if search.metric not in reported:
        raise ConfigError(f"metric: training does not report {search.metric!r} (it reports "
                          f"{', '.join(sorted(k for k in reported if '/' in k and k.count('/') < 2))}, ...)")
    return base


def check_size(search: SearchConfig) -> None:
    """At most MAX_TRIALS trials and MAX_VALUES values per key, unless ``allow_large``: a typo
    (``num_samples: 1e9``, a grid of a million) would otherwise keep a cluster busy for ever."""
    if search.allow_large:
        return
    for key, dist in search.search_space.items():
        if dist.kind in ("grid", "choice") and len(dist.args) > MAX_VALUES:
            raise ConfigError(f"search_space.{key}.{dist.kind}: {len(dist.args):,} values, more than the limit of "
                              f"{MAX_VALUES:,}; set allow_large: true to search them")
    trials = search.trial_count()
    if trials > MAX_TRIALS:
        key = "num_samples" if search.num_samples > MAX_TRIALS else "search_space"
        raise ConfigError(f"{key}: {trials:,} trials ({_size_terms(search)}), more than the limit of "
                          f"{MAX_TRIALS:,}; set allow_large: true to run them")


def _size_terms(search: SearchConfig) -> str:
    terms = [f"num_samples {search.num_samples:,}"]
    terms += [f"search_space.{k} ({len(d.args):,} values)" for k, d in search.search_space.items() if d.kind == "grid"]
    if search.variants and search.search_alg == "basic":
        terms.append(f"{len(search.variants):,} variants")
    return " x ".join(terms)


def asha_max_t(configs: list[TrainConfig]) -> int:
    """ASHA's ``max_t``: the most epochs of the trials checked together (:func:`corner_trials`)."""
    return max(max(c.epochs for c in configs), 1)


def check_scheduler(search: SearchConfig, corners: list[TrainConfig]) -> None:
    """ASHA asserts ``grace_period <= max_t`` when the search starts, inside Ray."""
    if search.scheduler.kind != "asha":
        return
    max_t = asha_max_t(corners)
    if search.scheduler.grace_period > max_t:
        raise ConfigError(f"scheduler.grace_period: {search.scheduler.grace_period} epochs, beyond the "
                          f"{max_t} epoch(s) the trials run; give at most {max_t}")


def check_search_alg(search: SearchConfig) -> None:
    """Optuna: installed (Tune imports it only when the search starts), and every ``choice`` a
    list of plain values (Optuna's categorical distribution takes no lists or mappings)."""
    if search.search_alg != "optuna":
        return
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("search_alg: optuna is not installed (pip install 'liqe-dist[optuna]'), "
                          "or use search_alg: basic") from None
    for key, dist in search.search_space.items():
        bad = next((v for v in dist.args if not isinstance(v, (str, int, float, bool, type(None)))), None) \
            if dist.kind == "choice" else None
        if bad is not None:
            raise ConfigError(f"search_space.{key}.choice: {bad!r}: Optuna draws only plain values (strings, "
                              f"numbers, booleans, null); use search_alg: basic, or variants")


def value_class(value: Any) -> Hashable:
    """The type and shape of a value (``float``, ``list[str, str]``, a mapping's keys): values
    of one class take the same path through the config's checks."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), value_class(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(value_class(v) for v in value))
    return type(value).__name__


def representatives(values: list) -> list:
    """One value per class (the first), and for numbers the smallest and largest too (bounds
    such as ``> 0`` or ``<= epochs`` show at the extremes)."""
    by_class: dict[Hashable, list] = {}
    for v in values:
        by_class.setdefault(value_class(v), []).append(v)
    out = []
    for members in by_class.values():
        picks = [members[0]]
        if isinstance(members[0], (int, float)) and not isinstance(members[0], bool):
            picks += [min(members), max(members)]
        out += [v for i, v in enumerate(picks) if not any(v is w or v == w for w in picks[:i])]
    return out


class KeyValues:
    """Checks the values of one dotted key of a training config: a full validation for each
    representative (:func:`representatives`), and every value by rebuilding only the dataclasses
    from the key's up to TrainConfig, from the field values ``from_dict`` would pass them (each
    one's ``__post_init__`` runs, the untouched sections are not checked again). A value that
    fails there gets the full validation, whose error is the one raised. Keys that path cannot
    follow (a model family, a field inside a plain mapping, an unknown key) get the full
    validation for every distinct value."""

    def __init__(self, train: dict[str, Any], key: str, base: TrainConfig):
        self.train, self.key = train, key
        self.chain = _owner_chain(train, key, base)

    def check(self, values: list) -> None:
        for value in representatives(values):
            self.full(value)
        if self.chain is None:  # every distinct value in full
            seen = set()
            for value in values:
                if repr(value) not in seen:
                    seen.add(repr(value))
                    self.full(value)
            return
        for value in values:
            self.one(value)

    def full(self, value: Any) -> TrainConfig:
        try:
            return validate_trial(self.train, {self.key: value})
        except ConfigError as exc:
            raise ConfigError(f"search_space.{self.key} = {value!r}: {exc}") from None

    def one(self, value: Any) -> None:
        levels, annotation = self.chain
        try:
            obj = _check(value, annotation, self.key)
            for cls, kwargs, part in reversed(levels):
                obj = cls(**{**kwargs, part: obj})
        except (ValueError, TypeError):
            self.full(value)  # the error as the full validation words it (or no error after all)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _owner_chain(train: dict[str, Any], key: str,
                 base: TrainConfig) -> tuple[list[tuple[type, dict, str]], Any] | None:
    """``([(class, checked field values, the field on the key's path), ...], the key's annotation)``
    from TrainConfig down to the dataclass holding the key's last part, as ``from_dict`` builds
    them from ``train``; None when the key does not follow dataclass fields all the way."""
    parts = key.split(".")
    raw, obj, levels = train, base, []
    for i, part in enumerate(parts):
        cls = type(obj)
        names = {f.name for f in dataclasses.fields(cls) if f.init} if dataclasses.is_dataclass(cls) else set()
        if part not in names or part == TAG or not isinstance(raw, dict):
            return None
        hints = _hints(cls)
        levels.append((cls, {k: _check(v, hints[k], k) for k, v in raw.items()}, part))
        if i == len(parts) - 1:
            return levels, hints[part]
        raw, obj = raw.get(part) or {}, getattr(obj, part)
        if obj is None:
            return None
    return None


def corner_trials(search: SearchConfig, limit: int = CORNER_TRIALS) -> list[dict[str, Any]]:
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


def search_dict(search: SearchConfig) -> dict:
    """The search as plain data (saved in the experiment folder, compared on restore).
    ``allow_large`` is left out: a permission, not a setting of the trials."""
    data = json.loads(json.dumps(to_dict(search)))
    data.pop("allow_large", None)
    return data

