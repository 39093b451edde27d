"""PMT-IQA by hand: shapes of the multi-scale features, the class bins (top edge included), the
two losses, the progressive weights by value, frozen batch norm, weight files and scoring."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from liqe_dist.data.crops import IMAGENET_MEAN, IMAGENET_STD, CropConfig
from liqe_dist.data.stream import unit_mos
from liqe_dist.models.pmt_iqa.config import PMTIQAConfig
from liqe_dist.models.pmt_iqa.model import PMTIQA, stage_sides
from liqe_dist.models.pmt_iqa.objective import pmt_losses, quality_class
from liqe_dist.models.weights import CheckpointError, load_weights, read_state_dict, save_weights
from liqe_dist.train.weighting import ProgressiveWeighting, WeightingConfig, build_weighting

TINY = PMTIQAConfig(width=8)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return PMTIQA(TINY).eval()


def crops(n: int, u: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, u, 3, 224, 224), generator=g, dtype=torch.uint8)


def test_multi_scale_features_have_the_public_codes_sizes(tiny):
    assert stage_sides(224) == (56, 28, 14, 7)
    assert tiny.backbone.channels == (32, 64, 128, 256)  # ResNet-50 expansion 4 at width 8
    # 1x1 conv to 16/32/64 channels, 7x7 pooling: 8x8, 4x4, 2x2 cells; stage 4: 1 cell of C4
    assert [fc.in_features for fc in tiny.stage_fc] == [16 * 64, 32 * 16, 64 * 4, 256]
    assert [fc.out_features for fc in tiny.stage_fc] == [28, 28, 28, 112 - 84]
    with torch.device("meta"):  # ResNet-50 at full width, no memory
        full = PMTIQA(PMTIQAConfig())
    assert full.backbone.channels == (256, 512, 1024, 2048)
    assert [fc.in_features for fc in full.stage_fc] == [1024, 512, 256, 2048]
    x = crops(2, 3)
    with torch.no_grad():
        feats = tiny.features(x.flatten(0, 1))
        q, logits = tiny(x)
        # by hand from the parts: normalise, stages, reduce + pool + fc, concat, trunk, heads
        norm = (x.flatten(0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
            IMAGENET_STD).view(3, 1, 1)
        stages = tiny.backbone(norm)
        assert [tuple(s.shape[1:]) for s in stages] == [(32, 56, 56), (64, 28, 28), (128, 14, 14), (256, 7, 7)]
        parts = [tiny.stage_fc[k](F.avg_pool2d(tiny.reduce[k](stages[k]), 7).flatten(1)) for k in range(3)]
        parts.append(tiny.stage_fc[3](F.avg_pool2d(stages[3], 7).flatten(1)))
        by_hand = torch.cat(parts, dim=1)
        h = F.leaky_relu(tiny.trunk[2](F.leaky_relu(tiny.trunk[0](by_hand))))
    assert feats.shape == (6, 112) and torch.allclose(feats, by_hand, atol=1e-5)
    assert q.shape == (2, 3) and logits.shape == (2, 3, 10)
    assert torch.allclose(q.flatten(), tiny.regression(h).flatten(), atol=1e-5)
    pred = tiny.predict(x)
    assert torch.allclose(pred.quality, 1 + 4 * q.mean(dim=1), atol=1e-6)  # LIQE's 1-5 scale
    assert torch.allclose(pred.heads["quality_class"].sum(dim=1), torch.ones(2))


def test_class_bins_include_the_top_edge():
    unit = torch.tensor([0.0, 0.05, 0.0999, 0.1, 0.55, 0.9, 0.99, 1.0])
    assert quality_class(unit, 10).tolist() == [0, 0, 0, 1, 5, 9, 9, 9]  # 1.0 is class 9, never 10
    # MOS scaled by each dataset's own range: the best image of a dataset is 1.0 -> class 9
    mos = torch.tensor([1.0, 5.0, 20.0, 70.0, float("nan")])
    unit = unit_mos(mos, torch.tensor([0, 0, 1, 1, 1]), [(1.0, 5.0), (20.0, 70.0)])
    assert unit[:4].tolist() == [0.0, 1.0, 0.0, 1.0] and unit[4].isnan()
    assert unit_mos(torch.tensor([3.0]), torch.tensor([0]), [(3.0, 3.0)]).tolist() == [0.5]  # one MOS value


def test_losses_by_hand(tiny):
    x = crops(3, 2, seed=1)
    batch = {"images": x, "has_mos": torch.tensor([True, True, False]),
             "mos_unit": torch.tensor([0.25, 1.0, float("nan")])}
    terms = pmt_losses(tiny, batch, 10)
    q, logits = tiny(x)
    l1 = (q[0] - 0.25).abs().sum() + (q[1] - 1.0).abs().sum()      # 2 crops each; image 2 has no MOS
    ce = F.cross_entropy(logits[:2].flatten(0, 1), torch.tensor([2, 2, 9, 9]), reduction="sum")
    assert int(terms["regression"].count) == 4 == int(terms["classification"].count)
    assert terms["regression"].total.item() == pytest.approx(l1.item(), rel=1e-5)
    assert terms["classification"].total.item() == pytest.approx(ce.item(), rel=1e-5)
    with pytest.raises(KeyError, match="mos_unit"):
        pmt_losses(tiny, {"images": x, "has_mos": batch["has_mos"]}, 10)


def test_progressive_weights_by_value():
    w = build_weighting(WeightingConfig(method="progressive"), ("classification", "regression"),
                        steps_per_epoch=3, total_epochs=20)
    assert isinstance(w, ProgressiveWeighting)
    seen = []
    for epoch in range(20):
        seen.append(w.weights())
        for _ in range(3):
            w.observe({"classification": 1.0, "regression": 1.0})
    assert seen[0] == {"classification": 1.0, "regression": 0.0}       # easy first
    assert seen[1]["regression"] == pytest.approx(1 / 19) and seen[1]["classification"] == pytest.approx(18 / 19)
    assert seen[19] == {"classification": 0.0, "regression": 1.0}      # t / (T - 1) reaches 1 at the last epoch


def test_frozen_batch_norm_stays_in_eval_mode():
    model = PMTIQA(PMTIQAConfig(width=8, frozen_bn=True)).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns) and model.trunk.training
    assert all(not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    before = bns[0].running_mean.clone()
    model(crops(2))
    assert torch.equal(bns[0].running_mean, before)  # running statistics untouched
    trainable = PMTIQA(PMTIQAConfig(width=8)).train()
    assert all(m.training for m in trainable.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_weight_file_names_its_family_and_rebuilds_the_model(tiny, tmp_path):
    path = save_weights(tiny, tmp_path / "pmt.safetensors", extra={"step": 3})
    _, meta = read_state_dict(path)
    assert meta["family"] == "pmt_iqa" and json.loads(meta["architecture"])["width"] == 8
    loaded = load_weights(path).eval()
    assert type(loaded) is PMTIQA and loaded.cfg.width == 8
    x = crops(2, 2)
    with torch.no_grad():
        assert torch.equal(loaded.predict(x).quality, tiny.predict(x).quality)
    with pytest.raises(CheckpointError, match="holds a 'pmt_iqa' model, not 'liqe'"):
        load_weights(path, family="liqe")
    with pytest.raises(CheckpointError, match="model_name apply to LIQE only"):
        load_weights(path, model_name="ViT-B-32")


def test_malformed_architecture_is_refused_before_allocation(tiny, tmp_path):
    from safetensors.torch import save_file

    state, meta = read_state_dict(save_weights(tiny, tmp_path / "pmt.safetensors"))
    for arch, problem in ((dict(json.loads(meta["architecture"]), width=10**6), "width"),
                          (dict(json.loads(meta["architecture"]), backbone="vgg"), "backbone"),
                          ({"width": 8}, "expected the keys")):
        bad = tmp_path / "bad.safetensors"
        save_file(state, str(bad), metadata={**meta, "architecture": json.dumps(arch)})
        with pytest.raises(CheckpointError, match=f"bad.safetensors: malformed PMT-IQA metadata.*{problem}"):
            load_weights(bad)
    other = PMTIQA(PMTIQAConfig(width=4))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "wrong.safetensors"),
              metadata=meta)  # width 8 declared, width 4 tensors
    with pytest.raises(CheckpointError, match="wrong.safetensors: weights do not fit PMT-IQA resnet50 of width 8"):
        load_weights(tmp_path / "wrong.safetensors")


def test_score_command_detects_the_family(tiny, tmp_path):
    from liqe_dist.cli import main

    path = save_weights(tiny, tmp_path / "pmt.safetensors")
    for i, size in enumerate([(300, 240), (260, 280)]):
        Image.effect_noise(size, 40 + 20 * i).convert("RGB").save(tmp_path / f"img{i}.png")
    out = tmp_path / "scores.csv"
    assert main(["score", str(tmp_path / "img0.png"), str(tmp_path / "img1.png"), "--checkpoint", str(path),
                 "--device", "cpu", "--precision", "fp32", "--no-progress", "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["source", "quality", "quality_class", "quality_class_prob", "width", "height",
                             "upsampled"]
    from liqe_dist.eval.scoring import Scorer

    direct = Scorer(tiny, device="cpu").score([str(tmp_path / "img0.png"), str(tmp_path / "img1.png")])
    assert Scorer(tiny, device="cpu").crops == CropConfig(eval_crops=4)  # the public code's 4 test crops
    assert [float(r["quality"]) for r in rows] == pytest.approx([d.quality for d in direct], abs=1e-5)


@pytest.mark.parametrize("backbone", ["resnet50", "resnet18"])
def test_backbone_takes_torchvisions_imagenet_state_dict(backbone, monkeypatch):
    """``pretrained: imagenet`` loads torchvision's ResNet state dict (classifier dropped) with
    strict=True: same names and shapes. torchvision is asked for IMAGENET1K_V1 (the weights the
    public code loads); the download is replaced here by the same architecture's random weights."""
    import torchvision

    from liqe_dist.models.pmt_iqa import spec

    asked, served = [], []
    real = getattr(torchvision.models, backbone)

    def fake(weights=None):
        asked.append(weights)
        served.append(real(weights=None))
        return served[-1]

    monkeypatch.setattr(torchvision.models, backbone, fake)
    model = spec.build(PMTIQAConfig(backbone=backbone, pretrained="imagenet"))
    assert asked == ["IMAGENET1K_V1"]
    expected = {k: v for k, v in served[0].state_dict().items() if not k.startswith("fc.")}
    got = model.backbone.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
