"""From an image to the 224 x 224 crops LIQE looks at.

The rules of the reference code, made explicit:

* Never resize for quality, except that an image whose sides both exceed 768 px is scaled
  (bilinear) so its short side is 768 (the reference's ``AdaptiveResize(768)``).
* Crops sit on a grid with stride 32 px, or 48 px when a side is >= 1024 px after that resize,
  enumerated row by row (``unfold`` order).
* Training takes 3 grid positions uniformly at random (with replacement), after a random
  horizontal flip of the whole image. Evaluation takes 15 positions evenly spaced along that
  enumeration: index ``i * (n // 15)``.
* Small images (a rule the reference lacks; it crashes): an image with a side under 224 px is
  upscaled (bicubic) so its short side is 224, and the result says so (``upsampled=True``); with
  ``small_images="refuse"`` it raises :class:`ImageTooSmallError` instead. An image whose long
  side exceeds ``max_aspect`` (16) times its short side is refused (:class:`ImageShapeError`)
  before any resizing: with it, an image has at most 768 x 768 x 16 = 9.4 megapixels after the
  resize rules (a 1 x 10 000 strip would otherwise be upsampled to 224 x 2 240 000). When the grid has fewer
  positions than crops asked for, evaluation spreads the crops over all positions
  (``floor(i * n / U)``), so each position is used about equally.

Departures the PMT-IQA public code's pipeline needs (all off by default):

* ``resize_to`` (width, height): the image is resized (PIL bilinear, as torchvision's
  ``Resize((h, w))`` on a PIL image) to exactly that size, aspect not kept, in place of the
  short-side-768 rule; ``max_aspect`` is checked first. The public code resizes BID with
  ``Resize((512, 512))`` (512 x 512) and KonIQ with ``Resize((512, 384))``, which is (height,
  width): a 1024 x 768 KonIQ image becomes 384 wide x 512 high, so ``resize_to: [384, 512]``.
* ``positions="random"``: each crop's top-left is drawn uniformly over every pixel position,
  top in [0, H - size], left in [0, W - size] (torchvision's ``RandomCrop``), for training and
  evaluation crops. Evaluation draws from a generator seeded by a stable hash of the sample's
  key (CRC-32, plus ``seed``), so its crops do not depend on ranks, world size or loader workers.
* ``flip_per_crop``: with ``flip``, every training crop gets its own random horizontal flip (the
  public code's per-patch ``RandomHorizontalFlip``) instead of one flip of the whole image.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Literal

import torch
from PIL import Image
from torchvision.transforms import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet models (PMT-IQA's backbone)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP = 224
RESIZE_SHORT_SIDE = 768


class ImageShapeError(ValueError):
    """An image's shape is refused by the crop rules (too thin, or too small by policy)."""


class ImageTooSmallError(ImageShapeError):
    """An image has a side under the crop size and the policy is to refuse it."""


@dataclass(frozen=True)
class CropConfig:
    """How crops are taken (defaults: the reference recipe; the module docstring has the rules)."""

    size: int = CROP
    train_crops: int = 3
    eval_crops: int = 15
    resize_short_side: int = RESIZE_SHORT_SIDE
    stride: int = 32
    large_stride: int = 48
    large_side: int = 1024
    flip: bool = True
    small_images: Literal["upsample", "refuse"] = "upsample"
    max_aspect: float = 16.0  # long side / short side beyond which an image is refused
    positions: Literal["grid", "random"] = "grid"  # random: any pixel position (PMT-IQA public code)
    flip_per_crop: bool = False  # with flip: one flip per training crop, not per image (PMT-IQA public code)
    resize_to: tuple[int, int] | None = None  # (width, height) px, replaces the short-side-768 rule
    seed: int = 0  # mixed into the key hash that seeds random evaluation positions

    def __post_init__(self) -> None:
        for name in ("size", "train_crops", "eval_crops", "stride", "large_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"crops.{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_aspect >= 1:
            raise ValueError(f"crops.max_aspect must be >= 1, got {self.max_aspect}")
        if self.small_images not in ("upsample", "refuse"):
            raise ValueError(f"crops.small_images must be 'upsample' or 'refuse', got {self.small_images!r}")
        if self.positions not in ("grid", "random"):
            raise ValueError(f"crops.positions must be 'grid' or 'random', got {self.positions!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"crops.seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.resize_to is not None:
            # frozen and hashable: a YAML list is stored as a tuple
            object.__setattr__(self, "resize_to", check_size(self.resize_to, "crops.resize_to", self.size))


def check_size(value, key: str, crop: int | None = None) -> tuple[int, int]:
    """``value`` as a (width, height) tuple of two positive ints (a list is accepted); with
    ``crop``, neither side may be under it. ValueError naming ``key`` otherwise."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise ValueError(f"{key} must be two positive integers [width, height], got {value!r}")
    size = (int(value[0]), int(value[1]))
    if crop is not None and min(size) < crop:
        raise ValueError(f"{key} {size[0]}x{size[1]} has a side under the crop size {crop} px")
    return size


@dataclass
class Crops:
    """Crops of one image: ``pixels`` is ``[U, 3, size, size]`` uint8 RGB, as decoded (a quarter
    of float32's bytes across process boundaries and to the GPU); :func:`normalise` turns it into
    the model's input on the device."""

    pixels: torch.Tensor
    size: tuple[int, int]  # (width, height) after the resize rules, px
    upsampled: bool


def fit_size(img: Image.Image, cfg: CropConfig = CropConfig(), source: str = "image") -> tuple[Image.Image, bool]:
    """Apply the resize rules; returns the image and whether it was upsampled (a side under the
    crop size was enlarged; with ``resize_to`` too, where that size does the enlarging)."""
    w, h = img.size
    if max(w, h) > cfg.max_aspect * min(w, h):
        raise ImageShapeError(f"{source}: {w}x{h} is thinner than 1:{cfg.max_aspect:g} (crops.max_aspect); "
                              "refused rather than resized")
    small = min(w, h) < cfg.size
    if small and cfg.small_images == "refuse":
        raise ImageTooSmallError(f"{source}: {w}x{h} has a side under {cfg.size} px "
                                 "(crops.small_images is 'refuse')")
    if cfg.resize_to is not None:
        width, height = cfg.resize_to
        # torchvision's Resize((h, w)) on a PIL image is PIL's bilinear resize to (w, h)
        resized = img if img.size == (width, height) else TF.resize(
            img, [height, width], interpolation=TF.InterpolationMode.BILINEAR)
        return resized, small
    if small:
        scale = cfg.size / min(w, h)
        new = (max(cfg.size, round(w * scale)), max(cfg.size, round(h * scale)))
        return img.resize(new, Image.BICUBIC), True
    if w > cfg.resize_short_side and h > cfg.resize_short_side:
        return TF.resize(img, cfg.resize_short_side, interpolation=TF.InterpolationMode.BILINEAR), False
    return img, False


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``[3, H, W]`` uint8."""
    return TF.pil_to_tensor(img)


def normalise(pixels: torch.Tensor, dtype: torch.dtype = torch.float32,
              mean: tuple[float, float, float] = CLIP_MEAN, std: tuple[float, float, float] = CLIP_STD) -> torch.Tensor:
    """uint8 crops ``[..., 3, H, W]`` -> normalised ``dtype`` (computed in float32, on
    ``pixels``' device): ``(x / 255 - mean) / std``, torchvision's ``to_tensor`` + ``normalize``.
    ``mean``/``std``: the model's (CLIP's by default)."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalise expects uint8 crops, got {pixels.dtype}")
    mean = torch.tensor(mean, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(std, device=pixels.device).view(3, 1, 1)
    return ((pixels.float() / 255.0 - mean) / std).to(dtype)


def grid_positions(height: int, width: int, cfg: CropConfig = CropConfig()) -> list[tuple[int, int]]:
    """(top, left) of every crop on the grid, row by row, like ``unfold`` enumerates them."""
    stride = cfg.large_stride if max(height, width) >= cfg.large_side else cfg.stride
    tops = range(0, height - cfg.size + 1, stride)
    lefts = range(0, width - cfg.size + 1, stride)
    return [(t, l) for t in tops for l in lefts]


def eval_indices(n: int, count: int) -> list[int]:
    """Evenly spaced picks from ``n`` grid positions (the reference's ``i * (n // count)``)."""
    if n >= count:
        step = n // count
        return [i * step for i in range(count)]
    return [(i * n) // count for i in range(count)]


def train_indices(n: int, count: int, generator: torch.Generator | None = None) -> list[int]:
    """Uniform random picks with replacement, as the reference's ``torch.randint``."""
    return torch.randint(0, n, (count,), generator=generator).tolist()


def random_positions(height: int, width: int, count: int, size: int = CROP,
                     generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """``count`` (top, left) drawn uniformly, top in [0, height - size] and left in
    [0, width - size] (torchvision's ``RandomCrop.get_params``, every pixel position)."""
    tops = torch.randint(0, height - size + 1, (count,), generator=generator)
    lefts = torch.randint(0, width - size + 1, (count,), generator=generator)
    return list(zip(tops.tolist(), lefts.tolist()))


def key_generator(key: str, seed: int = 0) -> torch.Generator:
    """A generator seeded by a stable hash of ``key`` (CRC-32; Python's ``hash`` of a string
    changes between processes) and ``seed``: the same key draws the same crops on any rank.
    ``seed`` is the CRC's start value (not high bits: torch's CPU generator keeps only the low
    32 bits of a seed), so two seeds never give one key the same draw."""
    return torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8", "surrogateescape"), seed))


def eval_positions(height: int, width: int, cfg: CropConfig, key: str) -> list[tuple[int, int]]:
    """(top, left) of the ``cfg.eval_crops`` evaluation crops of a ``height`` x ``width`` image
    (after the resize rules): evenly spaced grid positions, or random ones drawn from ``key``."""
    if cfg.positions == "random":
        return random_positions(height, width, cfg.eval_crops, cfg.size, key_generator(key, cfg.seed))
    grid = grid_positions(height, width, cfg)
    return [grid[i] for i in eval_indices(len(grid), cfg.eval_crops)]


def _cut(tensor: torch.Tensor, positions: list[tuple[int, int]], size: int) -> torch.Tensor:
    return torch.stack([tensor[:, t:t + size, l:l + size] for t, l in positions])


def eval_crops(img: Image.Image, cfg: CropConfig = CropConfig(), source: str = "image",
               key: str | None = None) -> Crops:
    """The ``cfg.eval_crops`` evaluation crops of an image. ``key`` (the sample's shard key;
    default ``source``) seeds random positions."""
    img, upsampled = fit_size(img, cfg, source)
    tensor = to_uint8_tensor(img)
    picks = eval_positions(tensor.shape[1], tensor.shape[2], cfg, source if key is None else key)
    return Crops(_cut(tensor, picks, cfg.size), img.size, upsampled)


def eval_crop_sets(img: Image.Image, cfgs: list[CropConfig], source: str = "image",
                   key: str | None = None) -> list[Crops]:
    """:func:`eval_crops` for several configs (models of different families scoring one image):
    the image is resized and converted once per distinct resize rule, not once per config."""
    fitted: dict[CropConfig, tuple[torch.Tensor, tuple[int, int], bool]] = {}
    out = []
    for cfg in cfgs:
        rule = replace(cfg, eval_crops=1, train_crops=1)
        if rule not in fitted:
            resized, upsampled = fit_size(img, cfg, source)
            fitted[rule] = (to_uint8_tensor(resized), resized.size, upsampled)
        tensor, size, upsampled = fitted[rule]
        picks = eval_positions(tensor.shape[1], tensor.shape[2], cfg, source if key is None else key)
        out.append(Crops(_cut(tensor, picks, cfg.size), size, upsampled))
    return out


def train_crops(img: Image.Image, cfg: CropConfig = CropConfig(), generator: torch.Generator | None = None,
                source: str = "image") -> Crops:
    """``cfg.train_crops`` random crops (grid or any position, ``cfg.positions``), after a random
    horizontal flip when ``cfg.flip``: of the whole image, or of each crop with ``flip_per_crop``."""
    img, upsampled = fit_size(img, cfg, source)
    count = cfg.train_crops
    if cfg.flip and cfg.flip_per_crop:
        flips = (torch.rand((count,), generator=generator) < 0.5).tolist()
    else:
        # the draw order of the default (one flip, then positions) is kept so seeds reproduce
        flips = [cfg.flip and torch.rand((), generator=generator).item() < 0.5] * count
    tensor = to_uint8_tensor(img)
    height, width = tensor.shape[1], tensor.shape[2]
    if cfg.positions == "random":
        picks = random_positions(height, width, count, cfg.size, generator)
    else:
        grid = grid_positions(height, width, cfg)  # the same for the flipped image: it depends on H, W only
        picks = [grid[i] for i in train_indices(len(grid), count, generator)]
    # a position is taken on the flipped image when its crop is flipped (flip, then crop)
    mirrored = tensor.flip(-1) if any(flips) else tensor
    pixels = torch.stack([(mirrored if f else tensor)[:, t:t + cfg.size, l:l + cfg.size]
                          for f, (t, l) in zip(flips, picks)])
    return Crops(pixels, img.size, upsampled)
