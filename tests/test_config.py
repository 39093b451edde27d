from dataclasses import dataclass, field

import pytest

from liqe_dist.config import ConfigError, from_dict, load_yaml, parse_overrides
from liqe_dist.data.crops import CropConfig
from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.train.weighting import WeightingConfig


@dataclass
class Example:
    model: LIQEConfig = field(default_factory=LIQEConfig)
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
    from liqe_dist.train.config import TrainConfig

    with pytest.raises(ConfigError, match="placement must be PACK, SPREAD"):
        from_dict(TrainConfig, {"datasets": [{"name": "a", "shards": "shards/a"}], "placement": "ANYWHERE"})


def test_base_files_merge_and_overrides_apply_last(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  name: liqe-tiny\n  tasks: [quality, scene]\nlr: 1.0e-5\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../base.yaml\nmodel:\n  precision: bf16\n")
    cfg = load_yaml(Example, child)
    # mappings merge key by key: the child's model keeps the base's name and tasks
    assert (cfg.model.name, cfg.model.tasks, cfg.model.precision, cfg.lr) == \
        ("liqe-tiny", ("quality", "scene"), "bf16", 1e-5)
    cfg = load_yaml(Example, child, parse_overrides(["model.tasks=[quality]", "lr=2e-5", "crops.eval_crops=3"]))
    assert cfg.model.tasks == ("quality",) and cfg.lr == 2e-5 and cfg.crops.eval_crops == 3
    with pytest.raises(ConfigError, match=r"child.yaml: unknown key model\.nmae"):
        load_yaml(Example, child, {"model.nmae": "x"})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["lr"])
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="base chain loops"):
        load_yaml(Example, tmp_path / "loop.yaml")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"lr: {value}\n")
    with pytest.raises(ConfigError, match="lr: expected a finite number"):
        load_yaml(Example, path)


def test_loss_recipe_and_knobs_are_checked_by_key():
    from liqe_dist.train.config import TrainConfig

    data = {"datasets": [{"name": "a", "shards": "shards/a"}]}
    with pytest.raises(ConfigError, match="model.loss.recipe: expected one of"):
        from_dict(TrainConfig, {**data, "model": {"loss": {"recipe": "mine"}}})
    with pytest.raises(ConfigError, match="model.loss.ties: expected one of"):
        from_dict(TrainConfig, {**data, "model": {"loss": {"ties": "sometimes"}}})
    with pytest.raises(ConfigError, match="model.loss: loss.phi_scale must be > 0"):
        from_dict(TrainConfig, {**data, "model": {"loss": {"phi_scale": -1.0}}})
    with pytest.raises(ConfigError, match="unknown key model.loss"):  # LIQE's losses, not PMT-IQA's
        from_dict(TrainConfig, {**data, "model": {"family": "pmt_iqa", "loss": {"recipe": "paper"}}})
    with pytest.raises(ConfigError, match="epochs must be >= 0"):
        from_dict(TrainConfig, {**data, "epochs": -1})


def test_a_base_model_section_of_another_family_is_replaced_not_merged(tmp_path):
    from liqe_dist.train.config import TrainConfig

    (tmp_path / "base.yaml").write_text("datasets: [{name: a, shards: shards/a}]\n"
                                        "model: {family: liqe, name: liqe-tiny, tasks: [quality]}\n")
    (tmp_path / "pmt.yaml").write_text("base: base.yaml\nmodel: {family: pmt_iqa, width: 8}\n")
    (tmp_path / "liqe.yaml").write_text("base: base.yaml\nmodel: {family: liqe, quality_levels: 2}\n")
    pmt = load_yaml(TrainConfig, tmp_path / "pmt.yaml")
    assert pmt.model.family == "pmt_iqa" and pmt.model.width == 8
    liqe = load_yaml(TrainConfig, tmp_path / "liqe.yaml")  # same family: merged key by key
    assert (liqe.model.name, liqe.model.tasks, liqe.model.quality_levels) == ("liqe-tiny", ("quality",), 2)
    with pytest.raises(ConfigError, match="unknown key model.name"):  # an override keeps the other keys
        load_yaml(TrainConfig, tmp_path / "base.yaml", {"model.family": "pmt_iqa"})
