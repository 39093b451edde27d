"""A sweep of the command line with bad inputs: each ends with a non-zero exit code and an error
line naming the file or key, never a traceback (unless --debug)."""

from __future__ import annotations

import json

import pytest

from conftest import photo
from liqe_dist.cli import main

GOOD_DATASET = "datasets: [{name: a, shards: SHARDS}]\nmodel: {name: liqe-tiny}\n"


@pytest.fixture
def files(tmp_path):
    photo(256, 256).save(tmp_path / "ok.png")
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "nomanifest").mkdir()
    bad = tmp_path / "badmanifest"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": "liqe-dist/shards-1", "dataset": "x"}))
    cfg = GOOD_DATASET.replace("SHARDS", str(tmp_path / "nomanifest"))
    (tmp_path / "good.yaml").write_text(cfg)
    (tmp_path / "dup.yaml").write_text(cfg + "epochs: 3\nepochs: 4\n")
    (tmp_path / "search.yaml").write_text("train: good.yaml\nsearch_space: {optim.lr: {grid: [1.0e-4, 1.0e-5]}}\n")
    (tmp_path / "protocol.yaml").write_text(f"train: good.yaml\ncross_dataset: [{tmp_path / 'nowhere'}]\n")
    (tmp_path / "nan.yaml").write_text(cfg + "optim: {lr: .nan}\n")
    (tmp_path / "neg.yaml").write_text(cfg + "loader_workers: -1\n")
    (tmp_path / "model.yaml").write_text(cfg.replace("liqe-tiny", "ViT-Q-99"))
    (tmp_path / "ckpt.yaml").write_text(cfg.replace("model: {name: liqe-tiny}",
                                                    "model: {name: liqe-tiny, checkpoint: /nope/w.pt}"))
    return tmp_path


CASES = [
    (["score", "{t}/missing.jpg"], "missing.jpg: no such file or folder"),
    (["score", "{t}/ok.png", "--model", "liqe-tiny", "--checkpoint", "{t}/garbage.pt"], "garbage.pt: cannot be read"),
    (["score", "{t}/ok.png", "--model", "ViT-Q-99"], "unknown model 'ViT-Q-99'"),
    (["pack", "csv", "{t}/missing.csv", "--no-progress"], "missing.csv"),
    (["pack", "csv", "{t}/empty.csv", "--no-progress"], "empty.csv"),
    (["shards", "info", "{t}/nowhere"], "nowhere: no such folder"),
    (["shards", "info", "{t}/badmanifest"], "badmanifest/manifest.json: unreadable manifest"),
    (["shards", "info", "{t}/foreign"], "foreign/manifest.json: malformed manifest"),
    (["shards", "verify", "{t}/nomanifest", "--no-progress"], "nomanifest/manifest.json: no manifest"),
    (["train", "--config", "{t}/missing.yaml"], "missing.yaml: cannot read config"),
    (["train", "--config", "{t}/dup.yaml"], "duplicate key 'epochs'"),
    (["train", "--config", "{t}/nan.yaml"], "optim.lr: expected a finite number"),
    (["train", "--config", "{t}/neg.yaml"], "loader_workers must be >= 0"),
    (["train", "--config", "{t}/model.yaml"], "model.name: unknown model 'ViT-Q-99'"),
    (["train", "--config", "{t}/ckpt.yaml"], "model.checkpoint: no such file"),
    (["train", "--config", "{t}/good.yaml", "--workers", "0"], "workers must be >= 1"),
    (["train", "--config", "{t}/good.yaml"], "nomanifest/manifest.json: no manifest"),  # before Ray starts
    (["train", "--check", "--config", "{t}/good.yaml"], "nomanifest/manifest.json: no manifest"),
    (["tune", "--check", "--config", "{t}/search.yaml"], "nomanifest/manifest.json: no manifest"),
    (["protocol", "--check", "--config", "{t}/protocol.yaml"], "nowhere"),
    (["eval", "{t}/nomanifest", "--model", "liqe-tiny", "--no-progress"], "no manifest"),
    (["eval", "--config", "{t}/good.yaml", "--checkpoint", "{t}/nope.safetensors"], "no such file"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_a_nonzero_exit(files, caplog, capsys, argv, message):
    code = main([a.format(t=files) for a in argv])  # an uncaught exception would fail the test here
    assert code != 0
    logged = caplog.text + capsys.readouterr().err
    assert message in logged, logged
    assert "Traceback" not in logged


def test_debug_shows_the_traceback(files):
    with pytest.raises(ValueError, match="duplicate key"):
        main(["--debug", "train", "--config", str(files / "dup.yaml")])


def test_table_problems_are_named(tmp_path):
    """Empty cells, non-finite MOS and oversized fields: named, and a NaN MOS is a reject, not a label."""
    from liqe_dist.data.adapters import DatasetFormatError, read_dataset
    from liqe_dist.data.packing import PackConfig, pack_records

    photo(240, 240).save(tmp_path / "a.png")
    photo(240, 240, 1).save(tmp_path / "b.png")
    (tmp_path / "t.csv").write_text("path,mos\na.png,\n")
    with pytest.raises(DatasetFormatError, match=r"t.csv:2: empty mos cell"):
        read_dataset("csv", tmp_path / "t.csv", "t")
    (tmp_path / "t.csv").write_text("path,mos\na.png," + "9" * 200_000 + "\n")
    with pytest.raises(DatasetFormatError, match="not a readable table"):
        read_dataset("csv", tmp_path / "t.csv", "t")
    (tmp_path / "t.csv").write_text("path,mos\na.png,nan\nb.png,3\n")
    result = pack_records(read_dataset("csv", tmp_path / "t.csv", "t"), tmp_path / "s", "t", {},
                          PackConfig(workers=1), progress=False)
    assert (result.samples, result.rejected) == (1, 1)
    assert "MOS nan is not a finite number" in (tmp_path / "s" / "rejects.tsv").read_text()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["mos_range"] == [3.0, 3.0]


def test_text_that_is_not_utf8_is_named(tmp_path):
    from liqe_dist.config import ConfigError, load_yaml
    from liqe_dist.data.adapters import DatasetFormatError
    from liqe_dist.data.adapters.label_lists import read_label_lists
    from liqe_dist.train.config import TrainConfig

    (tmp_path / "l.txt").write_bytes(b"caf\xe9.bmp\t1\tblur\tanimal\tinvalid\tinvalid\n")
    with pytest.raises(DatasetFormatError, match=r"l\.txt: not utf-8 text"):
        read_label_lists(tmp_path / "l.txt", tmp_path, "x")
    (tmp_path / "c.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not UTF-8 text"):
        load_yaml(TrainConfig, tmp_path / "c.yaml")


def test_zero_size_and_pickled_inputs_are_refused_plainly(tmp_path):
    import pickle
    import struct
    import zlib

    from liqe_dist.models.weights import CheckpointError, read_state_dict
    from liqe_dist.data.images import ImageDecodeError, decode_image

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    zero = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(ImageDecodeError, match="zero.png: "):
        decode_image(zero, "zero.png")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": object()}, f)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "evil.pt")
    assert "evil.pt: cannot be read with torch.load(weights_only=True)" in str(info.value)
    assert "weights_only=False" not in str(info.value) and "will likely succeed" not in str(info.value)


def test_check_validates_without_training(tmp_path, caplog):
    """``--check`` (what the SLURM scripts run before starting Ray): a valid config with its shard
    sets present passes, and nothing runs."""
    from shard_fixtures import pack_csv, write_csv_dataset

    shards = pack_csv(write_csv_dataset(tmp_path / "a", n_refs=3, per_ref=2, size=(64, 64)), tmp_path / "shards", "a")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(GOOD_DATASET.replace("SHARDS", str(shards)) + f"out_dir: {tmp_path / 'runs'}\n")
    caplog.set_level("INFO")
    assert main(["train", "--check", "--config", str(cfg)]) == 0
    assert f"{cfg}: valid" in caplog.text
    assert not (tmp_path / "runs").exists()


def test_version_prints_the_package_version(capsys):
    from liqe_dist import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"liqe-dist {__version__}"


def test_a_closed_pipe_ends_the_command_quietly():
    """``liqe-dist shards catalog | head -0``: the reader is gone before the command writes; it
    exits 0 without a traceback or a "Broken pipe" line, as Unix tools do."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "liqe_dist.cli", "shards", "catalog"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # before the child has imported anything, let alone written
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "Broken pipe" not in err and "Exception ignored" not in err, err
