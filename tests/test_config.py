from dataclasses import dataclass, field

import pytest

from liqe_dist.config import ConfigError, from_dict, load_yaml
from liqe_dist.crops import CropConfig
from liqe_dist.model import ModelConfig
from liqe_dist.weighting import WeightingConfig


@dataclass
class Example:
    model: ModelConfig = field(default_factory=ModelConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    batch_sizes: dict[str, int] = field(default_factory=dict)
    lr: float = 5e-6


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: liqe-tiny\n  tasks: [quality, distortion]\n"
                    "weighting:\n  temperature: 3\nbatch_sizes: {live: 4, koniq: 16}\nlr: 1.0e-5\n")
    cfg = load_yaml(Example, path)
    assert cfg.model.name == "liqe-tiny" and cfg.model.tasks == ("quality", "distortion")
    assert cfg.weighting.temperature == 3.0 and cfg.batch_sizes == {"live": 4, "koniq": 16}


@pytest.mark.parametrize("data,message", [
    ({"modle": {}}, "unknown key modle"),
    ({"model": {"nmae": "x"}}, "unknown key model.nmae"),
    ({"model": {"precision": "fp16"}}, "model.precision: expected one of"),
    ({"lr": "fast"}, "lr: expected a number"),
    ({"batch_sizes": {"live": 2.5}}, "batch_sizes.live: expected an integer"),
    ({"crops": {"eval_crops": 0}}, "crops.eval_crops must be >= 1"),
    ({"weighting": {"method": "gradnorm"}}, "weighting.method: expected one of"),
    ({"model": {"head": "mlp"}}, "model.head: expected one of"),
    ({"model": {"head": "linear"}}, "predicts quality only: set model.tasks"),
])
def test_bad_keys_are_named(data, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        from_dict(Example, data)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(Example, path)
    path.write_text("model:\n  precision: fp8\n")
    with pytest.raises(ConfigError, match="bad.yaml: model.precision"):
        load_yaml(Example, path)


def test_bad_ray_placement_is_named():
    from liqe_dist.train_config import TrainConfig

    with pytest.raises(ConfigError, match="placement must be PACK, SPREAD"):
        from_dict(TrainConfig, {"datasets": [{"name": "a", "shards": "shards/a"}], "placement": "ANYWHERE"})
