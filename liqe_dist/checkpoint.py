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
import tempfile
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


def save_weights(model: LIQE, path: str | Path, model_name: str, extra: dict | None = None) -> Path:
    """Write ``model``'s CLIP weights and what is needed to rebuild it to ``path`` (safetensors).

    The write goes to a temporary name first, so an interrupted save never leaves a file that
    looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = open_clip.get_model_config(model_name)
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
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
    tensors["logit_scale"] = tensors["logit_scale"].reshape(())  # [1] when it was trained
    if model.head is not None:
        tensors.update({f"{HEAD_PREFIX}{k}": v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()})
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


def _register_config(name: str, cfg_json: str) -> None:
    if name in open_clip.list_models() or not cfg_json:
        return
    folder = Path(tempfile.mkdtemp(prefix="liqe-model-cfg-"))
    (folder / f"{name}.json").write_text(cfg_json)
    open_clip.add_model_config(folder)


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
        model_name = meta["model_name"]
        _register_config(model_name, meta.get("model_cfg", ""))
        quick_gelu = json.loads(meta["quick_gelu"]) if quick_gelu is None else quick_gelu
        saved = json.loads(meta["vocabulary"])
        vocabulary = Vocabulary(tuple(saved["qualities"]), tuple(saved["scenes"]), tuple(saved["distortions"]),
                                separate=bool(saved.get("separate", False)))
        text_context = meta.get("text_context", text_context)
    elif quick_gelu is None:
        quick_gelu = True  # OpenAI CLIP weights were trained with QuickGELU
    clip = build_clip(model_name, None, quick_gelu)
    _load_into(clip, state, path, model_name)
    model = LIQE(clip, vocabulary, text_context=text_context, head="linear" if head else "prompts")
    if head:
        model.head.load_state_dict(head)
    return model


def _load_into(clip: torch.nn.Module, state: dict[str, torch.Tensor], path, model_name: str) -> None:
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
    clip.load_state_dict(state, strict=True)
