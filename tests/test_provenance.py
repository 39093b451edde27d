"""Every run folder records what made it (config.yaml, run.json); a resumed run refuses a changed
config, naming each changed key; the global batch is explicit."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from liqe_dist.cli import main
from liqe_dist.config import ConfigError, from_dict, load_yaml
from liqe_dist.data.crops import CropConfig
from liqe_dist.dist.engine import OptimConfig
from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.provenance import read_config, run_record, write_run_record
from liqe_dist.train.config import DatasetSpec, TrainConfig, resolved_config
from liqe_dist.train.state import check_resume, record_run

REFERENCE = Path(__file__).resolve().parents[1] / "launch" / "configs" / "liqe_reference.yaml"


def config(tmp_path, **kw) -> TrainConfig:
    args = dict(datasets=[DatasetSpec("a", str(tmp_path / "shards" / "a"), 4)], model=LIQEConfig(name="liqe-tiny"),
                optim=OptimConfig(lr=1e-4), crops=CropConfig(train_crops=1, eval_crops=2), epochs=3,
                steps_per_epoch=4, out_dir=str(tmp_path / "runs"), name="r")
    args.update(kw)
    return TrainConfig(**args)


def with_checkpoint(cfg: TrainConfig) -> Path:
    """A run folder as a run of ``cfg`` leaves it after its first checkpoint."""
    record_run(cfg, precision="fp32", device="cpu", world=1)
    (Path(cfg.run_dir) / "checkpoints" / "step-00000004").mkdir(parents=True)
    return Path(cfg.run_dir)


def test_the_recorded_config_reads_back_as_the_run(tmp_path):
    cfg = config(tmp_path)
    run = with_checkpoint(cfg)
    again = load_yaml(TrainConfig, run / "config.yaml")
    assert resolved_config(again) == resolved_config(cfg)
    record = json.loads((run / "run.json").read_text())["runs"][-1]
    assert record["precision"] == "fp32" and record["device"] == "cpu" and record["world"] == 1
    assert {"torch", "open_clip_torch", "deepspeed", "ray"} <= set(record["libraries"])
    assert record["libraries"]["torch"] and "cpu_flags" in record and "gpus" in record
    assert record["git"] is None or len(record["git"]["commit"]) == 40


def test_run_records_accumulate(tmp_path):
    write_run_record(tmp_path, precision="fp32")
    write_run_record(tmp_path, precision="bf16")
    runs = json.loads((tmp_path / "run.json").read_text())["runs"]
    assert [r["precision"] for r in runs] == ["fp32", "bf16"]
    assert run_record()["command"] == sys.argv and run_record()["cwd"] == os.getcwd()
    assert run_record(command=["liqe-dist", "train"])["command"] == ["liqe-dist", "train"]  # a driver's, passed on


@pytest.mark.parametrize("change, named", [
    ({"optim": OptimConfig(lr=1e-5)}, "optim.lr: 0.0001 -> 1e-05"),
    ({"epochs": 2}, "epochs: 3 -> 2"),
    ({"seed": 1}, "seed: 0 -> 1"),
    ({"workers": 4}, "workers: 2 -> 4"),
    ({"model": LIQEConfig(name="liqe-tiny", tasks=("quality",))}, "model.tasks"),
    ({"datasets": [DatasetSpec("a", "elsewhere", 4)]}, "datasets[0].shards"),
])
def test_a_changed_config_is_not_resumed(tmp_path, change, named):
    with_checkpoint(config(tmp_path))
    with pytest.raises(ConfigError, match="holds checkpoints of a run with another config") as err:
        check_resume(config(tmp_path, **change))
    assert named in str(err.value)


def test_safe_changes_resume(tmp_path):
    with_checkpoint(config(tmp_path))
    check_resume(config(tmp_path))
    check_resume(config(tmp_path, epochs=10, keep_checkpoints=5, checkpoint_every=2, max_failures=0,
                        placement="SPREAD", loader_workers=1))


def test_no_checkpoint_no_check(tmp_path):
    cfg = config(tmp_path)
    record_run(cfg, precision="fp32")
    check_resume(config(tmp_path, seed=5))  # nothing to resume: the run starts over


def test_train_refuses_a_changed_resume_before_ray_starts(tmp_path, caplog):
    import ray

    from shard_fixtures import pack_csv, write_csv_dataset

    pack_csv(write_csv_dataset(tmp_path / "raw", n_refs=1, per_ref=2), tmp_path / "shards", "a")
    cfg = config(tmp_path)
    run = with_checkpoint(cfg)
    (tmp_path / "train.yaml").write_text((run / "config.yaml").read_text())
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--set", "optim.lr=3e-5"]) == 2
    assert "optim.lr: 0.0001 -> 3e-05" in caplog.text and not ray.is_initialized()
    # --check (what a SLURM job runs before its cluster) refuses it too, and accepts the same config
    caplog.clear()
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--set", "optim.lr=3e-5", "--check"]) == 2
    assert "optim.lr: 0.0001 -> 3e-05" in caplog.text
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--set", "epochs=9", "--check"]) == 0
    # a run folder that is not a training's
    (tmp_path / "runs" / "other").mkdir()
    (tmp_path / "runs" / "other" / "notes.txt").write_text("mine")
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--set", "name=other", "--check"]) == 2
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--set", "name=other"]) == 2
    assert os.listdir(tmp_path / "runs" / "other") == ["notes.txt"] and not ray.is_initialized()


def test_print_config_is_the_resolved_config(tmp_path, capsys):
    assert main(["train", "--config", str(REFERENCE), "--print-config", "--workers", "4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["workers"] == 4 and printed["batch_is_global"] is True
    assert printed["optim"]["lr"] == 5e-6 and printed["model"]["precision"] == "fp32"
    assert from_dict(TrainConfig, printed).datasets[0].batch_size == 4


def test_the_reference_config_states_global_batches():
    cfg = load_yaml(TrainConfig, REFERENCE, {"workers": 4})
    assert [d.batch_size for d in cfg.rank_datasets] == [1, 1, 1, 1, 4, 4]
    assert "live 4 (4 worker(s) x 1)" in cfg.describe_batches()
    assert "koniq10k 16 (4 worker(s) x 4)" in cfg.describe_batches()
    with pytest.raises(ConfigError, match=r"datasets\.live\.batch_size: 4 images is the global batch .* 3 workers"):
        load_yaml(TrainConfig, REFERENCE, {"workers": 3})
    assert main(["train", "--config", str(REFERENCE), "--workers", "3", "--check"]) == 2


def test_per_rank_batches_grow_with_the_workers(tmp_path):
    cfg = config(tmp_path, workers=3)
    assert [d.batch_size for d in cfg.rank_datasets] == [4]
    assert "a 12 (3 worker(s) x 4)" in cfg.describe_batches()


def test_run_names_are_plain(tmp_path):
    with pytest.raises(ValueError, match="name"):
        config(tmp_path, name="../elsewhere")


def test_read_config_of_a_folder_without_one(tmp_path):
    assert read_config(tmp_path) is None


@pytest.mark.parametrize("command, config", [("tune", "tune_demo.yaml"), ("protocol", "protocol_demo.yaml")])
def test_search_and_protocol_print_their_resolved_config(tmp_path, capsys, command, config):
    """Printed with every default filled in, and read back as the same search."""
    assert main([command, "--config", str(REFERENCE.parent / config), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["train"]["optim"]["zero_stage"] is not None  # a default, filled in
    (tmp_path / "again.yaml").write_text(printed)
    assert main([command, "--config", str(tmp_path / "again.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
