"""LIQE weight files: the project format's LIQE metadata, and the OpenAI-format files users have.

* Project files (written through :meth:`LIQE.weights_state <liqe_dist.models.liqe.model.LIQE.weights_state>`):
  the CLIP state dict (open_clip/OpenAI key names) and the linear head of ablation (6), with
  metadata naming the architecture (its open_clip config inlined), the vocabulary and the text
  context, so the file alone rebuilds the model.
* The released LIQE checkpoint: a state dict of an OpenAI-format CLIP ViT-B/32 (QuickGELU).
* pyiqa's ``liqe_mix.pt``: the same under the key ``"params"``; reference training
  checkpoints: under ``"model_state_dict"`` (wrappers are removed by
  :func:`liqe_dist.models.weights.read_state_dict`).
"""

from __future__ import annotations

import json

import open_clip
import torch

from liqe_dist.models.liqe.model import HEAD_PREFIX, LIQE, build_clip
from liqe_dist.models.liqe.vocabulary import Vocabulary
from liqe_dist.models.weights import FORMAT, CheckpointError, check_fits

# What a model config embedded in a checkpoint may say: a plain open_clip CLIP (ViT or ModifiedResNet
# image tower, transformer text tower). Anything else (timm or Hugging Face towers, which would
# fetch code or weights) is refused, and every size is bounded before anything is built.
_CFG_KEYS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
_VISION_KEYS = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_INT_LIMITS = {"embed_dim": 16384, "layers": 256, "width": 16384, "head_width": 16384, "patch_size": 1024,
               "image_size": 4096, "context_length": 4096, "vocab_size": 1_000_000, "heads": 1024}
MAX_PARAMETERS = 5_000_000_000  # ~20 GB in fp32: larger than any CLIP this project trains
MAX_PROMPTS = 10_000            # a saved vocabulary becomes prompts to encode (LIQE has 495)


def _check_int(value, key: str, path) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT_LIMITS[key.rsplit(".", 1)[-1]]:
        raise CheckpointError(f"{path}: model config {key} = {value!r} is not an integer in "
                              f"1..{_INT_LIMITS[key.rsplit('.', 1)[-1]]}")


def validate_model_config(cfg, path) -> dict:
    """The model config a checkpoint carries, checked key by key (see ``_CFG_KEYS``)."""
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise CheckpointError(f"{path}: model config must hold embed_dim, vision_cfg and text_cfg")
    for keys, section, name in ((_CFG_KEYS, cfg, "model config"), (_VISION_KEYS, cfg["vision_cfg"], "vision_cfg"),
                                (_TEXT_KEYS, cfg["text_cfg"], "text_cfg")):
        if not isinstance(section, dict):
            raise CheckpointError(f"{path}: {name} must be a mapping")
        unknown = sorted(set(section) - keys)
        if unknown:
            raise CheckpointError(f"{path}: {name} has unsupported key(s) {unknown}; allowed: {sorted(keys)}")
    _check_int(cfg["embed_dim"], "embed_dim", path)
    if not isinstance(cfg.get("quick_gelu", False), bool):
        raise CheckpointError(f"{path}: model config quick_gelu must be true or false")
    for section in ("vision_cfg", "text_cfg"):
        for key, value in cfg[section].items():
            if key == "mlp_ratio":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 16:
                    raise CheckpointError(f"{path}: model config {section}.mlp_ratio = {value!r} is not in (0, 16]")
            elif key == "layers" and section == "vision_cfg" and isinstance(value, list):
                if len(value) != 4:
                    raise CheckpointError(f"{path}: model config vision_cfg.layers must be an integer or 4 integers")
                for v in value:
                    _check_int(v, "vision_cfg.layers", path)
            else:
                _check_int(value, f"{section}.{key}", path)
    return cfg


def _build_checked_clip(cfg: dict, state: dict[str, torch.Tensor], path, model_name: str,
                        quick_gelu: bool) -> torch.nn.Module:
    """A CLIP of architecture ``cfg`` holding ``state``: built on the meta device first (no
    memory) so a config that does not fit the tensors actually present, or is absurdly large,
    is refused before anything is allocated."""
    from open_clip.model import CLIP

    kwargs = {**cfg, "quick_gelu": quick_gelu}
    try:
        with torch.device("meta"):
            skeleton = CLIP(**kwargs)
    except Exception as exc:  # open_clip rejects inconsistent sizes in its own ways
        raise CheckpointError(f"{path}: model config cannot be built ({type(exc).__name__}: {exc})") from None
    size = sum(p.numel() for p in skeleton.parameters())
    if size > MAX_PARAMETERS:
        raise CheckpointError(f"{path}: model config declares {size:,} parameters (limit {MAX_PARAMETERS:,})")
    check_fits(skeleton, state, path, f"model {model_name!r}")
    return CLIP(**kwargs)


def from_weights(state: dict[str, torch.Tensor], meta: dict[str, str], path, model_name: str = "ViT-B-32",
                 vocabulary: Vocabulary | None = None, text_context: str = "cut",
                 quick_gelu: bool | None = None) -> LIQE:
    """LIQE from the tensors and metadata of a weights file (``path`` names it in errors).

    Project files carry their own architecture and vocabulary. For OpenAI-format files (the
    released LIQE checkpoint, pyiqa's ``liqe_mix.pt``) ``model_name`` names the architecture
    (ViT-B-32 for the released ones) and QuickGELU is used unless ``quick_gelu=False``.
    """
    head = {k[len(HEAD_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(HEAD_PREFIX)}
    if meta.get("format") == FORMAT:
        # The file's metadata names and describes the architecture: it is data, never a path or
        # code, and is checked against the tensors present before anything is built.
        model_name = str(meta.get("model_name", ""))[:200]
        try:
            cfg = json.loads(meta.get("model_cfg") or "null") or open_clip.get_model_config(model_name)
            quick_gelu = bool(json.loads(meta.get("quick_gelu", "false"))) if quick_gelu is None else quick_gelu
            saved = json.loads(meta["vocabulary"])
            vocabulary = Vocabulary(tuple(saved["qualities"]), tuple(saved["scenes"]), tuple(saved["distortions"]),
                                    separate=bool(saved.get("separate", False)))
            if vocabulary.size > MAX_PROMPTS or not all(isinstance(w, str) and len(w) <= 100 for w in
                                                       vocabulary.qualities + vocabulary.scenes + vocabulary.distortions):
                raise ValueError(f"vocabulary of {vocabulary.size} prompts or with labels that are not short "
                                 f"strings (limit {MAX_PROMPTS} prompts of labels up to 100 characters)")
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: malformed liqe-dist metadata ({type(exc).__name__}: {exc})") from None
        if cfg is None:
            raise CheckpointError(f"{path}: carries no model config and names no known model ({model_name!r})")
        text_context = "full" if meta.get("text_context") == "full" else "cut"
        clip = _build_checked_clip(validate_model_config(cfg, path), state, path, model_name, quick_gelu)
    else:
        if quick_gelu is None:
            quick_gelu = True  # OpenAI CLIP weights were trained with QuickGELU
        clip = build_clip(model_name, None, quick_gelu)  # the caller's name: trusted
    clip.liqe_model_cfg = cfg if meta.get("format") == FORMAT else None  # re-saved as it was loaded
    clip.liqe_model_name = model_name
    check_fits(clip, state, path, f"model {model_name!r}")
    clip.load_state_dict(state, strict=True)
    model = LIQE(clip, vocabulary, text_context=text_context, head="linear" if head else "prompts")
    if head:
        model.head.load_state_dict(head)
    return model
