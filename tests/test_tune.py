"""Searches and the paper's protocol: Ray Tune trials that are each a 2-worker DeepSpeed training
(real local Ray clusters, the tiny model, packed shards), and their configuration errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from liqe_dist.config import ConfigError
from shard_fixtures import pack_csv, write_csv_dataset
from slurm_cluster import slurm_unavailable

LIQE_DIST = str(Path(sys.executable).parent / "liqe-dist")


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """Two packed sets: ``a`` (20 references: val and test parts of 4 images) and ``b``."""
    root = tmp_path_factory.mktemp("tune-shards")
    a = pack_csv(write_csv_dataset(root / "a", n_refs=20, per_ref=2, size=(224, 232)), root / "shards", "a",
                 shard_max_count=10)
    b = pack_csv(write_csv_dataset(root / "b", n_refs=5, per_ref=2, size=(224, 232)), root / "shards", "b",
                 shard_max_count=10)
    return a, b


def train_keys(shards: Path, **changes) -> dict:
    keys = {"name": "t", "datasets": [{"name": "a", "shards": str(shards), "batch_size": 2}],
            "model": {"family": "liqe", "name": "liqe-tiny"}, "optim": {"lr": 1.0e-4, "zero_stage": 1},
            "crops": {"train_crops": 1, "eval_crops": 1}, "epochs": 2, "steps_per_epoch": 4,
            "checkpoint_every": 2, "workers": 2, "shuffle_buffer": 4}
    keys.update(changes)
    return keys


def write_search(path: Path, train: dict, **keys) -> Path:
    path.write_text(yaml.safe_dump({"train": train, **keys}, sort_keys=False))
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def events(trial_dir: Path) -> list[str]:
    return [json.loads(line)["event"] for line in (trial_dir / "events.jsonl").read_text().splitlines()]


# --- configuration errors: at start, the key named ---------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"search_space": {"optim.lrx": {"grid": [1e-4]}}}, "search_space.optim.lrx"),
    ({"search_space": {"optim.lr": {"uniform": [1e-3, 1e-4]}}}, "search_space.optim.lr: uniform: expected [low, high]"),
    ({"search_space": {"optim.lr": {"grid": [1e-4], "choice": [1e-3]}}}, "search_space.optim.lr: expected exactly one"),
    ({"search_space": {"optim.lr": {"gaussian": [0, 1]}}}, "unknown key search_space.optim.lr.gaussian"),
    ({"search_space": {"optim.lr": {"grid": [-1.0]}}}, "search_space.optim.lr = -1.0"),
    ({"search_space": {"optim.zero_stage": {"randint": [0, 4]}}}, "search_space.optim.zero_stage = 3"),
    ({"metric": "val/koniq/srcc"}, "metric: training does not report 'val/koniq/srcc'"),
    ({"scheduler": {"kind": "pbt"}}, "a Ray Train V2 trial cannot be paused"),
    ({"variants": {"x": {"model.taskz": ["quality"]}}}, "variants.x: unknown key model.taskz"),
])
def test_search_config_errors_name_the_key(tmp_path, shard_sets, change, message):
    from liqe_dist.tune.config import load_search

    keys = {"search_space": {"optim.lr": {"grid": [1e-4, 1e-3]}}, **change}
    path = write_search(tmp_path / "s.yaml", train_keys(shard_sets[0]), **keys)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_search(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shard_sets):
    """An unlabelled corpus (``pack folder``): a manifest of kind corpus, no MOS."""
    from PIL import Image

    from liqe_dist.data.corpus import CorpusConfig, pack_corpus

    root = tmp_path_factory.mktemp("tune-corpus")
    (root / "photos").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "photos" / f"{i}.png")
    return pack_corpus(root / "photos", root / "shards" / "photos", "photos", CorpusConfig(workers=1),
                       progress=False).out_dir


def check_fails(command: str, path: Path, caplog, *expected: str) -> str:
    """``liqe-dist COMMAND --check --config PATH`` exits 2 with one line naming the file and ``expected``."""
    from liqe_dist.cli import main

    caplog.clear()
    assert main([command, "--check", "--config", str(path)]) == 2, caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"{path}: "), errors
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


GRID = {"optim.lr": {"grid": [1e-4, 1e-3]}}
LARGE = [
    ({"num_samples": 10 ** 9}, ["num_samples: 2,000,000,000 trials (num_samples 1,000,000,000 x "
                                "search_space.optim.lr (2 values)), more than the limit of 10,000; set allow_large: true"]),
    ({"num_samples": "1e9"}, ["num_samples: expected an integer"]),
    ({"search_space": {"optim.lr": {"grid": [1e-4 * (1 + i / 1000) for i in range(1000)]},
                       "optim.weight_decay": {"grid": [i / 1000 for i in range(1000)]}}},
     ["search_space: 1,000,000 trials (num_samples 1 x search_space.optim.lr (1,000 values) x "
      "search_space.optim.weight_decay (1,000 values)), more than the limit of 10,000"]),
    ({"search_space": {"optim.lr": {"choice": [1e-4 * (1 + i / 10 ** 5) for i in range(20_000)]}}},
     ["search_space.optim.lr.choice: 20,000 values, more than the limit of 10,000", "allow_large: true"]),
    ({"num_samples": 3, "variants": {f"v{i}": {"seed": i} for i in range(4000)}},
     ["search_space: 24,000 trials (num_samples 3 x search_space.optim.lr (2 values) x 4,000 variants)"]),
]
FOLDERS = [
    ({"scheduler": {"kind": "asha", "grace_period": 3}}, ["scheduler.grace_period: 3 epochs, beyond the 2 epoch(s)"]),
    ({"seed": -1}, ["seed must be 0..4294967295"]),
    ({"seed": 2 ** 32}, ["seed must be 0..4294967295"]),
    ({"name": "a\x00b"}, ["name 'a\\x00b' must be one plain name: it holds '\\x00'"]),
    ({"name": "a\nb"}, ["name 'a\\nb' must be one plain name: it holds '\\n'"]),
    ({"name": "n" * 300}, ["name is 300 bytes long; at most 200"]),
    ({"name": ".hidden"}, ["name: expected a folder name"]),
    ({"storage": "runs\x00x"}, ["storage: expected a folder path"]),
]


@pytest.mark.parametrize("keys, expected", LARGE + FOLDERS,
                         ids=[f"large-{i}" for i in range(len(LARGE))] + [f"keys-{i}" for i in range(len(FOLDERS))])
def test_check_refuses_what_would_fail_once_ray_runs(tmp_path, shard_sets, caplog, keys, expected):
    """``tune --check`` (and the search's own start) refuses a size beyond the stated limits, an
    ASHA grace period past the epochs (Ray asserts grace_period <= max_t), a seed numpy cannot
    take, a name that is no plain folder name: one line with the file and the dotted key."""
    path = write_search(tmp_path / "s.yaml", train_keys(shard_sets[0]),
                        **{"storage": str(tmp_path / "runs"), "search_space": GRID, **keys})
    check_fails("tune", path, caplog, *expected)


def test_allow_large_lets_a_large_search_through(tmp_path, shard_sets, caplog):
    from liqe_dist.cli import main
    from liqe_dist.tune.config import load_search, search_dict

    path = write_search(tmp_path / "s.yaml", train_keys(shard_sets[0]), storage=str(tmp_path / "runs"),
                        search_space=GRID, num_samples=20_000)
    check_fails("tune", path, caplog, "num_samples: 40,000 trials (num_samples 20,000 x search_space.optim.lr "
                                      "(2 values))")
    caplog.set_level("INFO")
    assert main(["tune", "--check", "--config", str(path), "--set", "allow_large=true"]) == 0
    assert f"{path}: valid" in caplog.text
    search = load_search(path, {"allow_large": True})
    assert search.trial_count() == 40_000 and "allow_large" not in search_dict(search)  # not a trial setting


def test_check_refuses_an_experiment_folder_of_another_search(tmp_path, shard_sets, caplog):
    """STORAGE/NAME holding a search with other settings is refused by --check (the search itself
    refuses it too, but only after it started Ray); the same search there is a resume and passes."""
    import dataclasses

    from liqe_dist.cli import main
    from liqe_dist.tune.config import load_search, search_dict
    from liqe_dist.tune.results import SEARCH_FILE
    from liqe_dist.tune.search import with_absolute_paths

    path = write_search(tmp_path / "s.yaml", train_keys(shard_sets[0]), storage=str(tmp_path / "runs"),
                        name="exp", search_space=GRID)
    search = with_absolute_paths(load_search(path))
    search.experiment_dir.mkdir(parents=True)
    saved = search.experiment_dir / SEARCH_FILE
    saved.write_text(json.dumps(search_dict(search)))
    caplog.set_level("INFO")
    assert main(["tune", "--check", "--config", str(path)]) == 0  # the same search: resumed
    other = dataclasses.replace(search, num_samples=3)
    saved.write_text(json.dumps(search_dict(other)))
    check_fails("tune", path, caplog, f"name: {search.experiment_dir} holds a search with other settings",
                "num_samples: 3 -> 1")
    saved.write_text("[1, 2]")
    check_fails("tune", path, caplog, "name: ", "is not a saved search")
    saved.unlink()
    search.experiment_dir.rmdir()
    search.experiment_dir.write_text("a file")
    check_fails("tune", path, caplog, "name: the experiment folder", "is not a folder")


def test_check_refuses_unlabelled_sets(tmp_path, shard_sets, corpus, caplog):
    """A corpus (no MOS) as a protocol's cross-dataset set, or as a training set of a search
    (also one a variant adds), is refused naming the key: scoring it there would fail once Ray runs."""
    a, b = shard_sets
    protocol = tmp_path / "p.yaml"
    protocol.write_text(yaml.safe_dump({"train": train_keys(a), "splits": [0, 1], "storage": str(tmp_path / "runs"),
                                        "cross_dataset": [str(b), str(corpus)]}))
    check_fails("protocol", protocol, caplog, f"cross_dataset[1]: {corpus} is an unlabelled corpus (no MOS)")
    search = write_search(tmp_path / "s.yaml", train_keys(corpus), storage=str(tmp_path / "runs"), search_space=GRID)
    check_fails("tune", search, caplog, f"train.datasets[0].shards: {corpus} is an unlabelled corpus")
    two = [{"name": "a", "shards": str(a), "batch_size": 2}, {"name": "c", "shards": str(corpus), "batch_size": 2}]
    search = write_search(tmp_path / "s.yaml", train_keys(a), storage=str(tmp_path / "runs"), search_space=GRID,
                          variants={"plain": {}, "more": {"datasets": two}})
    check_fails("tune", search, caplog, f"variants.more.datasets[1].shards: {corpus} is an unlabelled corpus")


def test_a_large_grid_is_checked_with_few_full_validations(tmp_path, shard_sets, monkeypatch):
    """A 10^4-value grid: every value is checked (a bad one anywhere is named), but the full
    training config is validated only for a few representatives and the keys' corner trials,
    not once per value (11.6 s for 10^4 values before)."""
    import liqe_dist.tune.config as config
    from liqe_dist.tune.config import CORNER_TRIALS, load_search

    calls = []
    full = config.validate_trial
    monkeypatch.setattr(config, "validate_trial", lambda train, overrides: calls.append(overrides) or full(train, overrides))
    lrs = np.geomspace(1e-5, 1e-3, 10_000).tolist()
    path = write_search(tmp_path / "s.yaml", train_keys(shard_sets[0]), storage=str(tmp_path / "runs"),
                        search_space={"optim.lr": {"grid": lrs}})
    assert load_search(path).trial_count() == 10_000
    assert len(calls) <= CORNER_TRIALS + 8, len(calls)

    # A value only the per-value check can tell bad: placement is a string checked in TrainConfig's
    # __post_init__, and the bad one is neither the first nor an extreme.
    places = ["PACK", "SPREAD"] * 5000
    places[6001] = "EVERYWHERE"
    calls.clear()
    path = write_search(tmp_path / "s.yaml", train_keys(shard_sets[0]), storage=str(tmp_path / "runs"),
                        search_space={"placement": {"grid": places}})
    with pytest.raises(ConfigError, match="search_space.placement = 'EVERYWHERE': placement must be PACK"):
        load_search(path)
    assert len(calls) <= 8, len(calls)


@pytest.mark.parametrize("key, values", [
    ("optim.lr", [1e-4, -1.0, 0.0, "1e-3", float("inf"), True]),
    ("optim.schedule", [None, "cosine", "cosine_cycles", "nope"]),
    ("model.loss.recipe", ["paper", "reference", "other"]),
    ("model.loss", [{"recipe": "reference"}, {"phi_scale": "x"}, {"unknown": 1}]),
    ("crops.size", [224, 256, 32]),
    ("epochs", [0, 3, -1]),
    ("datasets", [[], [{"name": "a", "shards": "/x", "batch_size": 2}] * 2, [{"name": "a", "shards": "/x"}]]),
    ("model.family", ["liqe", "pmt_iqa", "other"]),
    ("weighting.method", ["dwa", "equal", "progressive", "x"]),
])
def test_the_per_value_check_agrees_with_the_full_validation(shard_sets, key, values):
    """Each value is accepted or refused exactly as building the whole trial config would."""
    from liqe_dist.tune.config import KeyValues, validate_trial

    train = train_keys(shard_sets[0])
    check = KeyValues(train, key, validate_trial(train, {}))
    for value in values:
        try:
            validate_trial(train, {key: value})
            expected = None
        except ConfigError as exc:
            expected = f"search_space.{key} = {value!r}: {exc}"
        try:
            check.one(value) if check.chain is not None else check.full(value)
            got = None
        except ConfigError as exc:
            got = str(exc)
        assert got == expected, (key, value)


def test_optuna_without_optuna_is_a_clear_error(tmp_path, shard_sets):
    from liqe_dist.tune.config import load_search

    pytest.importorskip("ray.tune.search.optuna")
    try:
        import optuna  # noqa: F401
        pytest.skip("optuna is installed")
    except ImportError:
        pass
    path = write_search(tmp_path / "s.yaml", train_keys(shard_sets[0]), search_alg="optuna",
                        search_space={"optim.lr": {"loguniform": [1e-5, 1e-3]}})
    with pytest.raises(ConfigError, match="search_alg: optuna is not installed"):
        load_search(path)


def test_train_file_is_read_relative_to_the_search_file_and_set_overrides(tmp_path, shard_sets):
    from liqe_dist.config import parse_overrides
    from liqe_dist.tune.config import load_search

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "train.yaml").write_text(yaml.safe_dump(train_keys(shard_sets[0])))
    path = tmp_path / "conf" / "s.yaml"
    path.write_text(yaml.safe_dump({"train": "train.yaml", "search_space": {"optim.lr": {"grid": [1e-4, 1e-3]}}}))
    search = load_search(path, parse_overrides(["train.epochs=5", "num_samples=3"]))
    assert search.num_samples == 3
    assert search.trial_config({"optim.lr": 1e-3}).epochs == 5
    assert search.trial_config({"optim.lr": 1e-3}).optim.lr == 1e-3


def test_a_changed_search_is_refused_naming_the_change(tmp_path, shard_sets):
    import dataclasses

    from liqe_dist.tune.config import load_search
    from liqe_dist.tune.results import SEARCH_FILE
    from liqe_dist.tune.search import check_experiment, with_absolute_paths
    from liqe_dist.tune.config import search_dict

    path = write_search(tmp_path / "s.yaml", train_keys(shard_sets[0]), storage=str(tmp_path / "runs"),
                        search_space={"optim.lr": {"grid": [1e-4, 1e-3]}})
    search = with_absolute_paths(load_search(path))
    assert not check_experiment(search)
    search.experiment_dir.mkdir(parents=True)
    (search.experiment_dir / SEARCH_FILE).write_text(json.dumps(search_dict(search)))
    assert check_experiment(search)  # the same search: restored
    changed = dataclasses.replace(search, search_space={**search.search_space,
                                                        "optim.lr": type(search.search_space["optim.lr"])(grid=[1e-2])})
    with pytest.raises(ConfigError, match=r"search_space\.optim\.lr\.grid: \[0\.0001, 0\.001\] -> \[0\.01\]"):
        check_experiment(changed)


def test_reported_metrics_are_the_ones_all_ranks_agree_on():
    from liqe_dist.tune.trial import agreed_metrics

    ranks = [{"loss": 0.5, "val/mean_srcc": float("nan"), "step_seconds": 1.0},
             {"loss": 0.5, "val/mean_srcc": float("nan"), "step_seconds": 3.0}]
    assert agreed_metrics(ranks)["step_seconds"] == 2.0
    assert agreed_metrics(ranks)["loss"] == 0.5
    ranks[1]["loss"] = 0.5 * (1 + 1e-15)  # the last bits of a sum in another order
    assert agreed_metrics(ranks)["loss"] == 0.5
    ranks[1]["loss"] = 0.25
    with pytest.raises(RuntimeError, match=r"ranks reported different loss: \[0\.5, 0\.25\]"):
        agreed_metrics(ranks)


def test_protocol_report_medians_from_split_values(tmp_path):
    """The report's statistics on hand-made trial folders (no training)."""
    from liqe_dist.tune.protocol import write_report

    values = {0: 0.70, 1: 0.90, 2: 0.80, 3: 0.60}
    for i, (split, srcc) in enumerate(values.items()):
        trial = tmp_path / f"trial_{i:05d}"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps({"split": split}))
        (trial / "best.json").write_text(json.dumps({"test/a/srcc": srcc, "test/a/plcc": srcc + 0.05,
                                                     "val/a/srcc": 0.1, "step": 4}))
    report = write_report(tmp_path)
    rows = {(r["dataset"], r["criterion"]): r for r in read_rows(tmp_path / "report.csv")}
    assert float(rows["a", "srcc"]["median"]) == pytest.approx(0.75)
    assert float(rows["a", "plcc"]["median"]) == pytest.approx(0.80)
    assert float(rows["a", "srcc"]["std"]) == pytest.approx(np.std(list(values.values()), ddof=1))
    assert "| model | 0.750 / 0.800 |" in report.read_text()


# --- real searches ------------------------------------------------------------------------------


@pytest.fixture
def local_cluster():
    import ray

    from liqe_dist.run.ray_train import start_local_cluster

    start_local_cluster(3)  # one trial of 2 workers x 1 CPU at a time, and room for the trials' drivers
    yield ray
    ray.shutdown()


def live_groups_in_cluster(ray) -> list[str]:
    return sorted(k for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_asha_stops_a_hopeless_trial_and_frees_its_workers(tmp_path, shard_sets, local_cluster):
    """lr 1e-12 leaves the loss where it starts (~1.15; the others reach ~0.8 within an epoch):
    ASHA stops that trial, the second, at its first rung. The third trial still gets its workers
    (Train V2 used to keep a stopped trial's placement group: the next trial never started), and
    afterwards no placement group is left and every CPU is free."""
    from liqe_dist.tune.config import load_search
    from liqe_dist.tune.search import run_search

    ray = local_cluster
    path = write_search(tmp_path / "s.yaml", train_keys(shard_sets[0]), name="asha", storage=str(tmp_path / "runs"),
                        metric="loss", mode="min", search_space={"optim.lr": {"grid": [1e-3, 1e-12, 3e-4]}},
                        scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2})
    rows = run_search(load_search(path))
    exp = tmp_path / "runs" / "asha"
    table = {r["trial"]: r for r in read_rows(exp / "results.csv")}
    assert len(table) == len(rows) == 3
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses)  # best (lowest) first
    assert table["trial_00000"]["status"] == "finished" and table["trial_00000"]["epochs"] == "2"  # first at the rung
    assert table["trial_00001"]["status"] == "stopped early" and table["trial_00001"]["epochs"] == "1"
    assert float(table["trial_00001"]["optim.lr"]) == 1e-12 and float(table["trial_00001"]["loss"]) > 1.0
    assert table["trial_00002"]["status"] in ("finished", "stopped early")  # it ran after the stopped one
    # What Tune saw is what the run wrote (the agreed report, not a rank's own numbers).
    last = json.loads((exp / "trial_00000" / "result.json").read_text().splitlines()[-1])
    steps = read_rows(exp / "trial_00000" / "steps.csv")
    assert last["loss"] == pytest.approx(float(steps[-1]["loss"]), rel=1e-12)
    assert (exp / "best.yaml").exists() and (exp / "search.png").stat().st_size > 0
    assert "| trial_00001 | stopped early | 1e-12 | 1 |" in (exp / "results.md").read_text()

    assert live_groups_in_cluster(ray) == []
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(slurm_unavailable() is None, reason="proven on a real SLURM cluster here: "
                    "test_slurm.py::test_requeued_search_resumes_and_runs_every_trial_once")
def test_a_killed_search_resumes_where_it_stopped(tmp_path, shard_sets):
    """SIGKILL the ``liqe-dist tune`` driver while its second trial trains, run the command again:
    the finished trial is not rerun, the other continues from its checkpoint, each step once."""
    path = write_search(tmp_path / "s.yaml", train_keys(shard_sets[0], steps_per_epoch=3), name="killed",
                        storage=str(tmp_path / "runs"), metric="loss", mode="min",
                        search_space={"optim.lr": {"grid": [1e-3, 3e-4]}})
    exp = tmp_path / "runs" / "killed"
    cmd = [LIQE_DIST, "tune", "--config", str(path)]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while not (exp / "trial_00001" / "checkpoints" / "step-00000002" / "rank-1.pt").exists():
        assert driver.poll() is None, driver.stdout.read().decode()
        assert time.time() < deadline, "the second trial never checkpointed"
        time.sleep(0.5)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert events(exp / "trial_00000") == ["start", "finish"]
    assert "finish" not in events(exp / "trial_00001")
    time.sleep(10)  # the dead driver's cluster winds down

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stderr
    assert "| trial_00000 | finished |" in done.stdout and "| trial_00001 | finished |" in done.stdout
    assert events(exp / "trial_00000") == ["start", "finish"]  # not rerun
    assert events(exp / "trial_00001")[-2:] == ["resume", "finish"]
    for trial in ("trial_00000", "trial_00001"):
        steps = [int(r["step"]) for r in read_rows(exp / trial / "steps.csv")]
        assert steps == list(range(1, 7)), (trial, steps)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_protocol_over_three_splits_reports_medians_and_cross_dataset(tmp_path, shard_sets, local_cluster, capsys):
    from liqe_dist.cli import main
    from liqe_dist.tune.protocol import load_protocol, run_protocol

    a, b = shard_sets
    path = tmp_path / "protocol.yaml"
    # one worker per trial: the protocol's bookkeeping is under test here, not data parallelism
    path.write_text(yaml.safe_dump({"train": train_keys(a, epochs=1, steps_per_epoch=2, workers=1), "splits": [0, 1, 2],
                                    "cross_dataset": [str(b)], "name": "p", "storage": str(tmp_path / "runs")}))
    report = run_protocol(load_protocol(path))
    exp = report.parent
    per_split: dict[str, list[float]] = {"srcc": [], "plcc": []}
    for trial in sorted(exp.glob("trial_*")):
        best = json.loads((trial / "best.json").read_text())
        for c in per_split:
            per_split[c].append(best[f"test/a/{c}"])
    assert sorted(json.loads((t / "params.json").read_text())["split"] for t in exp.glob("trial_*")) == [0, 1, 2]
    rows = {(r["dataset"], r["criterion"]): r for r in read_rows(exp / "report.csv")}
    for c, values in per_split.items():
        assert float(rows["a", c]["median"]) == pytest.approx(float(np.median(values)), abs=1e-12)
        assert rows["a", c]["splits"] == "3"
    cross = json.loads((exp / "trial_00000" / "cross_dataset.json").read_text())
    assert cross["b"]["images"] == 10  # the whole set, not a part of a split
    assert float(rows["→ b", "srcc"]["median"]) == pytest.approx(
        np.median([json.loads((t / "cross_dataset.json").read_text())["b"]["srcc"] for t in exp.glob("trial_*")]))
    text = report.read_text()
    assert "| | a |" in text and "Cross-dataset" in text

    # The report rebuilds from the folder alone.
    (exp / "report.csv").unlink()
    (exp / "results.csv").unlink()
    capsys.readouterr()
    assert main(["report", str(exp)]) == 0
    assert read_rows(exp / "report.csv") == list(rows.values())
    assert len(read_rows(exp / "results.csv")) == 3

    # Cross-dataset evaluation alone: a checkpoint on two whole sets.
    assert main(["eval", "--checkpoint", str(exp / "trial_00000" / "best.safetensors"), "--part", "all",
                 "--no-progress", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("a ", "b "))}
    assert lines["a"][-5] == "40" and lines["b"][-5] == "10"  # images column: every image of each set


def test_shipped_search_and_protocol_configs_load():
    """launch/configs: the demo search and protocol, the paper's Table 2 protocol, and the ablation
    protocol whose variants are the ablation configs (each trial gets that config's keys)."""
    from liqe_dist.tune.config import load_search
    from liqe_dist.tune.protocol import load_protocol

    configs = Path(__file__).resolve().parents[1] / "launch" / "configs"
    search = load_search(configs / "tune_demo.yaml")
    assert search.scheduler.kind == "asha" and search.trial_config({"optim.lr": 2e-4}).optim.lr == 2e-4
    assert load_protocol(configs / "protocol_demo.yaml").splits == [0, 1, 2]
    table2 = load_protocol(configs / "protocol_liqe.yaml")
    assert table2.splits == list(range(10)) and len(table2.search().trial_config({"split": 3}).datasets) == 6
    ablations = load_protocol(configs / "protocol_ablations.yaml").search()
    frozen = ablations.trial_config({"split": 0, "variant": "(3) frozen text encoder"})
    liqe = ablations.trial_config({"split": 0, "variant": "LIQE"})
    assert frozen.model.freeze_text and not liqe.model.freeze_text
    assert ablations.trial_config({"split": 0, "variant": "quality + scene"}).model.tasks == ("quality", "scene")


def test_trials_at_a_time_follow_the_cluster(tmp_path, shard_sets):
    """Without max_concurrent_trials: as many trials as the CPUs (one kept for the drivers) and
    GPUs hold; GPU trials take 8 CPUs per worker by default."""
    import dataclasses

    from liqe_dist.tune.config import load_search
    from liqe_dist.tune.search import concurrent_trials, trial_resources

    path = write_search(tmp_path / "s.yaml", train_keys(shard_sets[0]),
                        search_space={"workers": {"grid": [1, 2]}})
    search = load_search(path)
    assert trial_resources(search) == (2.0, 0)  # the most any trial asks for
    assert concurrent_trials(search, {"CPU": 3.0}) == 1
    assert concurrent_trials(search, {"CPU": 9.0}) == 4
    gpu = dataclasses.replace(search, train={**search.train, "use_gpu": True})
    assert trial_resources(gpu) == (16.0, 2)
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 3   # CPU-bound: 63 // 16
    assert concurrent_trials(gpu, {"CPU": 200.0, "GPU": 8.0}) == 4  # GPU-bound: 8 // 2
    assert concurrent_trials(dataclasses.replace(gpu, max_concurrent_trials=2), {"CPU": 200.0, "GPU": 8.0}) == 2


def test_a_search_stopped_before_its_end_says_so_and_exits_130(tmp_path, shard_sets, monkeypatch, caplog):
    """Tune returns normally after SIGINT (Ctrl+C, or a SLURM job's time-limit signal): a search
    with unfinished trials is an interruption naming them, not a result table."""
    import liqe_dist.tune.search as search_module
    from liqe_dist.cli import main
    from liqe_dist.tune.search import SearchInterrupted, ensure_finished

    rows = [{"trial": "trial_00000", "status": "finished"}, {"trial": "trial_00001", "status": "unfinished"}]
    with pytest.raises(SearchInterrupted, match=r"1 trial\(s\) unfinished \(trial_00001\); the same command"):
        ensure_finished("s", rows)
    ensure_finished("s", rows[:1])  # all finished: nothing to say

    path = write_search(tmp_path / "s.yaml", train_keys(shard_sets[0]), name="s", storage=str(tmp_path / "runs"),
                        search_space={"seed": {"grid": [1, 2]}})
    monkeypatch.setattr(search_module, "run_search", lambda search, address=None: ensure_finished(search.name, rows))
    assert main(["tune", "--config", str(path)]) == 130
    assert "interrupted: search s stopped with 1 trial(s) unfinished (trial_00001)" in caplog.text
