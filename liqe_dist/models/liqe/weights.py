"""Model weights on disk: the project's safetensors format and the formats users already have.

Nothing here unpickles arbitrary objects: ``.pt`` files are read with ``weights_only=True``.

* Project format (``.safetensors``): the CLIP state dict (open_clip/OpenAI key names) with
  metadata naming the architecture (its open_clip config inlined), the vocabulary and the
  text context, so the file alone rebuilds the model.
* Released LIQE checkpoint: a state dict of an OpenAI-format CLIP ViT-B/32 (QuickGELU).
* pyiqa's ``liqe_mix.pt``: the same under the key ``"params"``.
* Reference training checkpoints: the same under ``"model_state_dict"``.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import LIQE, build_clip
from .vocabulary import VOCABULARY_VERSION, Vocabulary

FORMAT = "liqe-dist/weights-1"
_WRAPPER_KEYS = ("params", "model_state_dict", "state_dict", "model")
_PREFIXES = ("module.", "clip_model.", "clip.", "model.")
HEAD_PREFIX = "liqe_head."  # the linear head of ablation (6), next to CLIP's own keys
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


class CheckpointError(ValueError):
    """A weights file is unreadable or does not fit the model; the message names the file."""


def save_weights(model: LIQE, path: str | Path, model_name: str, extra: dict | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s CLIP weights and what is needed to rebuild it to ``path`` (safetensors).

    ``state``: ``model.state_dict()``-keyed tensors to write instead of the module's own (a bf16
    run's float32 master weights, :func:`liqe_dist.engine.master_state_dict`). The write
    goes to a temporary name first, so an interrupted save never leaves a file that looks complete.
    """
    state = model.state_dict() if state is None else state
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = getattr(model.clip, "liqe_model_cfg", None) or open_clip.get_model_config(model_name)
    meta = {
        "format": FORMAT,
        "model_name": model_name,
        "model_cfg": json.dumps(cfg) if cfg else "",
        "quick_gelu": json.dumps(_uses_quick_gelu(model.clip)),
        "vocabulary": json.dumps({"qualities": model.vocabulary.qualities,
                                  "scenes": model.vocabulary.scenes,
                                  "distortions": model.vocabulary.distortions,
                                  "separate": model.vocabulary.separate}),
        "vocabulary_version": VOCABULARY_VERSION,
        "text_context": "full" if model.prompt_tokens.shape[1] == _context(model.clip) else "cut",
        "extra": json.dumps(extra or {}),
        "head": "prompts" if model.head is None else "linear",
    }
    tensors = {k.removeprefix("clip."): v.detach().contiguous().cpu() for k, v in state.items() if k.startswith("clip.")}
    tensors["logit_scale"] = tensors["logit_scale"].reshape(())  # [1] when it was trained
    if model.head is not None:
        tensors.update({f"{HEAD_PREFIX}{k.removeprefix('head.')}": v.detach().contiguous().cpu()
                        for k, v in state.items() if k.startswith("head.")})
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def _context(clip) -> int:
    pos = clip.positional_embedding if hasattr(clip, "positional_embedding") else clip.text.positional_embedding
    return pos.shape[0]


def _uses_quick_gelu(clip) -> bool:
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in clip.modules())


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata from any supported weights file, wrappers and prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    meta: dict[str, str] = {}
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({_load_reason(exc)}); "
                                  "only plain tensor state dicts are accepted") from None
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in _NON_PARAMETER_KEYS}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    return state, meta


def _load_reason(exc: Exception) -> str:
    """The informative line of a torch.load error: torch's weights-only message opens with advice
    to unpickle arbitrary code (never taken here); the cause follows "WeightsUnpickler error:"."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        cause = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].strip()
        return f"not a plain tensor file: {cause}" if cause else "not a plain tensor file"
    return text.splitlines()[0] if text else type(exc).__name__


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
    _check_fits(skeleton, state, path, model_name)
    return CLIP(**kwargs)


def load_weights(path: str | Path, model_name: str = "ViT-B-32", vocabulary: Vocabulary | None = None,
                 text_context: str = "cut", quick_gelu: bool | None = None) -> LIQE:
    """Build LIQE from a weights file.

    Project files carry their own architecture and vocabulary. For OpenAI-format files (the
    released LIQE checkpoint, pyiqa's ``liqe_mix.pt``) ``model_name`` names the architecture
    (ViT-B-32 for the released ones) and QuickGELU is used unless ``quick_gelu=False``.
    """
    state, meta = read_state_dict(path)
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
    _load_into(clip, state, path, model_name)
    model = LIQE(clip, vocabulary, text_context=text_context, head="linear" if head else "prompts")
    if head:
        model.head.load_state_dict(head)
    return model


def _load_into(clip: torch.nn.Module, state: dict[str, torch.Tensor], path, model_name: str) -> None:
    _check_fits(clip, state, path, model_name)
    clip.load_state_dict(state, strict=True)


def _check_fits(clip: torch.nn.Module, state: dict[str, torch.Tensor], path, model_name: str) -> None:
    """Every tensor the model has, of the same shape, and nothing else; the error names the file."""
    own = clip.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[:2]})")
        raise CheckpointError(f"{path}: weights do not fit model {model_name!r}: " + "; ".join(parts))
