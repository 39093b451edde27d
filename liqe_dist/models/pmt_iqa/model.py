"""PMT-IQA (Pan et al., "Progressive Multi-task Learning for Blind Image Quality Assessment"):
multi-scale ResNet features -> a shared trunk -> quality regression and quality classification.

As the public code (github pqy000/PMT-IQA, ``models.py``, ``MultiTaskIQANet(28, 112, 112, 56,
28, 14, 10)``) builds it, for 224 x 224 crops and a ResNet-50 (stage channels C1..C4 = 256, 512,
1024, 2048; ``width`` scales them):

    crop [3, 224, 224] -> stem -> stage 1 [C1, 56, 56] -> ... -> stage 4 [C4, 7, 7]
    stage k (k = 1, 2, 3): 1x1 conv C_k -> 16, 32, 64 channels, AvgPool 7x7 stride 7
        (cells 8x8, 4x4, 2x2) -> flatten (1024, 512, 256) -> FC -> 28 features
    stage 4: AvgPool 7x7 -> 2048 -> FC -> 112 - 3 x 28 = 28 features
    concat -> 112 -> FC 112 -> LeakyReLU -> FC 14 -> LeakyReLU        (the shared trunk)
    regression head: FC 14 -> 1                                        q (MOS scaled to [0, 1], or raw)
    classification head: FC 14 -> LeakyReLU -> FC 10                   logits of 10 quality bins

The paper's text describes the trunk as 112 -> 14; the code has the extra 112 -> 112 layer and
the two-layer classification head, and this module follows the code. The model regresses the
MOS scaled to [0, 1] by its dataset's range, or the raw label under the reference recipe (see
:mod:`.targets`); :meth:`PMTIQA.predict` reports ``1 + 4 q`` (raw outputs first mapped onto
[0, 1] by the label range they trained on) so its scores sit on LIQE's 1-5 scale (a linear map,
unclamped: rank correlations are those of q).
"""

from __future__ import annotations

import json

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from liqe_dist.data.crops import IMAGENET_MEAN, IMAGENET_STD, normalise
from liqe_dist.models.base import IQAModel, LossTerm, Prediction
from liqe_dist.models.pmt_iqa.config import TASKS, PMTIQAConfig

BLOCKS = {"resnet50": (Bottleneck, (3, 4, 6, 3)), "resnet18": (BasicBlock, (2, 2, 2, 2))}
REDUCED_CHANNELS = (16, 32, 64)  # the public code's 1x1 convolutions of stages 1-3
POOL = 7                          # its AvgPool2d(7, stride=7)

#: Architecture fields of :class:`PMTIQAConfig` a weight file records (the rest are training options).
ARCHITECTURE = ("backbone", "width", "crop_size", "stage_features", "feature_size", "trunk_sizes", "classes")
#: What a weight file records of the training targets (how :meth:`PMTIQA.predict` reads its output).
TARGETS = ("target_scale", "target_range")


def stage_sides(crop: int) -> tuple[int, int, int, int]:
    """Side in cells of each stage's feature map for ``crop`` x ``crop`` inputs (stride-2 stem
    conv, stride-2 max pool, stride-2 stages 2-4, each ``ceil(n / 2)``)."""
    n = (crop + 1) // 2          # conv1 7x7 stride 2 pad 3
    n = (n + 1) // 2             # max pool 3x3 stride 2 pad 1
    sides = [n]
    for _ in range(3):
        n = (n + 1) // 2
        sides.append(n)
    return tuple(sides)


class ResNetStages(nn.Module):
    """A torchvision-layout ResNet without its classifier (same parameter names, so ImageNet
    weights load as they are), returning the output of each of the four stages."""

    def __init__(self, backbone: str = "resnet50", width: int = 64):
        super().__init__()
        block, layers = BLOCKS[backbone]
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._inplanes = width
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.channels = tuple(m * width * block.expansion for m in (1, 2, 4, 8))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self._inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * block.expansion
        layers += [block(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out


class PMTIQA(IQAModel):
    """PMT-IQA for one :class:`PMTIQAConfig`; see the module docstring for the shapes."""

    family = "pmt_iqa"
    eval_crops = 4  # the public code's test_patch_num (its crops are random; here evenly spaced)
    # bf16 moves the demo's trained PMT-IQA's test SRCC by 0.016 (0.47 -> 0.45; the ResNet's
    # convolutions, not the heads: fp32 heads recover 0.003 of it; launch/bench_precision.py),
    # so precision auto scores it in fp32 and a bf16 run evaluates its float32 masters.
    auto_bf16 = False

    def __init__(self, cfg: PMTIQAConfig = PMTIQAConfig()):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNetStages(cfg.backbone, cfg.width)
        sides = stage_sides(cfg.crop_size)
        cells = [(s // POOL) ** 2 for s in sides]
        c = self.backbone.channels
        self.reduce = nn.ModuleList(nn.Conv2d(c[k], REDUCED_CHANNELS[k], 1, bias=False) for k in range(3))
        self.pool = nn.AvgPool2d(POOL, stride=POOL)
        last = cfg.feature_size - 3 * cfg.stage_features
        self.stage_fc = nn.ModuleList([nn.Linear(REDUCED_CHANNELS[k] * cells[k], cfg.stage_features) for k in range(3)]
                                      + [nn.Linear(c[3] * cells[3], last)])
        trunk, size = [], cfg.feature_size
        for out in cfg.trunk_sizes:
            trunk += [nn.Linear(size, out), nn.LeakyReLU()]
            size = out
        self.trunk = nn.Sequential(*trunk)
        self.regression = nn.Linear(size, 1)
        self.classification = nn.Sequential(nn.Linear(size, size), nn.LeakyReLU(), nn.Linear(size, cfg.classes))
        for m in [*self.reduce, *self.stage_fc]:  # the public code's kaiming-normal heads
            nn.init.kaiming_normal_(m.weight)
        self._freeze_bn(cfg.frozen_bn)

    # -- the family seam ------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS

    @property
    def crop_size(self) -> int:
        return self.cfg.crop_size

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        """Crops ``[N, 3, S, S]`` -> multi-scale features ``[N, feature_size]``. uint8 crops (what
        the data pipeline gives) are normalised here with ImageNet's statistics, on their
        device; float crops are taken as normalised already."""
        if crops.dtype == torch.uint8:
            x = normalise(crops, self.dtype, IMAGENET_MEAN, IMAGENET_STD)
        else:
            x = crops.to(self.dtype)
        stages = self.backbone(x)
        parts = [fc(self.pool(self.reduce[k](stages[k])).flatten(1)) for k, fc in enumerate(self.stage_fc[:3])]
        parts.append(self.stage_fc[3](self.pool(stages[3]).flatten(1)))
        return torch.cat(parts, dim=1)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 crops ``[B, U, 3, S, S]`` -> (q ``[B, U]`` regressed quality in MOS/[0, 1] units,
        class logits ``[B, U, classes]``), at least float32, one row per crop."""
        b, u = crops.shape[:2]
        if crops.shape[-1] != self.cfg.crop_size or crops.shape[-2] != self.cfg.crop_size:
            raise ValueError(f"PMT-IQA built for {self.cfg.crop_size} px crops got {tuple(crops.shape[-2:])}")
        h = self.trunk(self.features(crops.flatten(0, 1)))
        out = torch.promote_types(h.dtype, torch.float32)  # bf16 -> float32, float64 stays
        return self.regression(h).to(out).view(b, u), self.classification(h).to(out).view(b, u, -1)

    def training_losses(self, batch: dict, rank_sizes: list[int] | None = None) -> dict[str, LossTerm]:
        from liqe_dist.models.pmt_iqa.objective import pmt_losses

        return pmt_losses(self, batch, self.cfg.classes)

    def predict(self, images: torch.Tensor) -> Prediction:
        """Quality ``1 + 4 q`` (q averaged over the crops; raw targets first mapped by
        ``target_range`` onto [0, 1]) and the mean class probabilities."""
        q, logits = self(images)
        q = q.mean(dim=1)
        if self.cfg.target_scale == "raw" and self.cfg.target_range is not None:  # raw labels -> [0, 1]
            lo, hi = self.cfg.target_range
            q = (q - lo) / (hi - lo)
        return Prediction(quality=1.0 + 4.0 * q,
                          heads={"quality_class": logits.softmax(dim=-1).mean(dim=1)})

    @property
    def heads(self) -> dict[str, tuple[str, ...]]:
        n = self.cfg.classes
        return {"quality_class": tuple(f"{i / n:.2f}-{(i + 1) / n:.2f}" for i in range(n))}

    def weights_state(self, state: dict[str, torch.Tensor] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        state = self.state_dict() if state is None else state
        arch = {k: getattr(self.cfg, k) for k in ARCHITECTURE}
        targets = {k: getattr(self.cfg, k) for k in TARGETS}
        return dict(state), {"architecture": json.dumps(arch), "targets": json.dumps(targets)}

    # -- batch norm -------------------------------------------------------------------------
    def _freeze_bn(self, frozen: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(not frozen)
                m.bias.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> "PMTIQA":
        """As ``nn.Module.train``, except that with ``frozen_bn`` batch norm stays in eval mode
        (running statistics) while the rest trains."""
        super().train(mode)
        if mode and self.cfg.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self
