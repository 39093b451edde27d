import csv
import math

import pytest
import torch

from liqe_dist.models.base import Prediction
from scipy.stats import spearmanr

from shard_fixtures import pack_csv, write_csv_dataset
from liqe_dist.data.crops import CropConfig, eval_crops
from liqe_dist.data.records import make_key
from liqe_dist.data.images import decode_image
from liqe_dist.eval.shard_eval import DatasetEval, _update, evaluate_shards, output_statistics
from liqe_dist.models.liqe.model import predictions_from_logits
from liqe_dist.models.liqe.vocabulary import Vocabulary


def test_task_accuracies_by_hand():
    v = Vocabulary()
    logits = torch.full((2, 495), -50.0)
    logits[0, v.index(0, 1, 3)] = 0.0   # image 0: scene 1 (cityscape) then scene 2 (human) ...
    logits[0, v.index(0, 2, 3)] = -1.0
    logits[1, v.index(4, 8, 0)] = 0.0   # image 1: scene 8 (others), distortion 0
    out = predictions_from_logits(logits, v)
    out = Prediction(out.score, {"scene": out.scene, "distortion": out.distortion})
    scenes = torch.zeros(2, 9)
    scenes[0, [2, 5]] = 1   # labels human + night: top-2 is {cityscape, human}: 1 hit of 2
    scenes[1, 8] = 1        # others: 1 hit of 1
    batch = {"keys": ["a", "b"], "mos": torch.tensor([1.0, 2.0]), "scenes": scenes,
             "distortion": torch.tensor([3, 5]), "has_distortion": torch.tensor([True, True])}
    ev = DatasetEval("x")
    _update(ev, batch, output_statistics(out, batch).tolist())
    assert (ev.scene_hits, ev.scene_labels) == (2, 3)
    assert ev.distortion_accuracy == 0.5
    assert math.isnan(DatasetEval("y").scene_accuracy)


def test_evaluate_shards_scores_the_whole_test_part(tmp_path, tiny_liqe):
    shard_dir = pack_csv(write_csv_dataset(tmp_path / "raw", n_refs=10, per_ref=2), tmp_path / "shards")
    res = evaluate_shards(tiny_liqe, [shard_dir], split=2, part="test", crops=CropConfig(eval_crops=2),
                          progress=False)
    ev = res["toy"]
    assert len(ev.keys) == len(set(ev.keys)) == 4  # 2 test references x 2 images
    assert ev.scene_labels > 0 and ev.distortion_labels == 4
    # each score is the model's q_hat for that image's file; the criteria are those of the scores
    files = {make_key("toy", r["path"]): (tmp_path / "raw" / r["path"], float(r["mos"]))
             for r in csv.DictReader(open(tmp_path / "raw" / "labels.csv"))}
    with torch.no_grad():
        expected = [tiny_liqe(eval_crops(decode_image(files[k][0]), CropConfig(eval_crops=2)).pixels[None]).score.item()
                    for k in ev.keys]
    assert ev.score == pytest.approx(expected, abs=1e-5)
    assert ev.mos == [files[k][1] for k in ev.keys]
    assert ev.quality.n == 4
    assert ev.quality.srcc == pytest.approx(spearmanr(ev.score, ev.mos)[0], abs=1e-12)


def test_eval_command_scores_a_config_or_a_checkpoint(tmp_path, capsys):
    """``liqe-dist eval``: the model a training config builds (here the zero-shot Table 4 row,
    shrunk to the tiny model), and a saved checkpoint, give the same numbers as evaluate_shards."""
    from liqe_dist.models.weights import save_weights
    from liqe_dist.cli import main
    from liqe_dist.config import load_yaml
    from liqe_dist.models.registry import build_model
    from liqe_dist.train.config import TrainConfig

    shard_dir = pack_csv(write_csv_dataset(tmp_path / "raw", n_refs=10, per_ref=2), tmp_path / "shards")
    config = "launch/configs/ablations/t4_1_pretrained_clip_c2.yaml"
    sets = ["model.name=liqe-tiny", "model.pretrained=null", "crops.eval_crops=2",
            f"datasets=[{{name: toy, shards: {shard_dir}}}]"]
    argv = ["eval", "--config", config, "--no-progress", "--out", str(tmp_path / "out")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert [r["dataset"] for r in rows] == ["toy"] and rows[0]["images"] == "4"
    assert (tmp_path / "out" / "scatter.png").stat().st_size > 0
    cfg = load_yaml(TrainConfig, config, {"model.name": "liqe-tiny", "model.pretrained": None})
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    assert model.vocabulary.qualities == ("bad", "good")
    expected = evaluate_shards(model, [shard_dir], 0, "test", CropConfig(eval_crops=2), progress=False)["toy"]
    assert float(rows[0]["srcc"]) == pytest.approx(expected.quality.srcc, abs=1e-9)
    assert "toy" in capsys.readouterr().out
    # a checkpoint, with the shard set named on the command line
    save_weights(model, tmp_path / "m.safetensors")
    assert main(["eval", str(shard_dir), "--checkpoint", str(tmp_path / "m.safetensors"), "--no-progress",
                 "--out", str(tmp_path / "out2")]) == 0
    rows2 = list(csv.DictReader(open(tmp_path / "out2" / "metrics.csv")))
    assert rows2[0]["srcc"] == rows[0]["srcc"] != "nan"
    assert main(["eval", "--checkpoint", str(tmp_path / "nope.safetensors"), str(shard_dir)]) == 2
