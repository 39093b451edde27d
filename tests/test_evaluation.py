import math

import torch

from shard_fixtures import pack_csv, write_csv_dataset
from liqe_dist.crops import CropConfig
from liqe_dist.evaluation import DatasetEval, _update, evaluate_shards
from liqe_dist.model import predictions_from_logits
from liqe_dist.vocabulary import Vocabulary


def test_task_accuracies_by_hand():
    v = Vocabulary()
    logits = torch.full((2, 495), -50.0)
    logits[0, v.index(0, 1, 3)] = 0.0   # image 0: scene 1 (cityscape) then scene 2 (human) ...
    logits[0, v.index(0, 2, 3)] = -1.0
    logits[1, v.index(4, 8, 0)] = 0.0   # image 1: scene 8 (others), distortion 0
    out = predictions_from_logits(logits, v)
    scenes = torch.zeros(2, 9)
    scenes[0, [2, 5]] = 1   # labels human + night: top-2 is {cityscape, human}: 1 hit of 2
    scenes[1, 8] = 1        # others: 1 hit of 1
    batch = {"keys": ["a", "b"], "mos": torch.tensor([1.0, 2.0]), "scenes": scenes,
             "distortion": torch.tensor([3, 5]), "has_distortion": torch.tensor([True, True])}
    ev = DatasetEval("x")
    _update(ev, batch, out)
    assert (ev.scene_hits, ev.scene_labels) == (2, 3)
    assert ev.distortion_accuracy == 0.5
    assert math.isnan(DatasetEval("y").scene_accuracy)


def test_evaluate_shards_scores_the_whole_test_part(tmp_path, tiny_liqe):
    shard_dir = pack_csv(write_csv_dataset(tmp_path / "raw", n_refs=10, per_ref=2), tmp_path / "shards")
    res = evaluate_shards(tiny_liqe, [shard_dir], split=2, part="test", crops=CropConfig(eval_crops=2),
                          progress=False)
    ev = res["toy"]
    assert len(ev.keys) == len(set(ev.keys)) == 4  # 2 test references x 2 images
    assert ev.quality.n == 4 and -1 <= ev.quality.srcc <= 1
    assert all(1 <= s <= 5 for s in ev.score)
    assert ev.scene_labels > 0 and ev.distortion_labels == 4
