"""Model weight files, for every family: reading any supported file, writing the project's.

Nothing here unpickles arbitrary objects: ``.pt`` files are read with ``weights_only=True``.

* Project format (``.safetensors``): the family's tensors with string metadata: ``format``,
  ``family`` (which :mod:`registry <liqe_dist.models.registry>` entry rebuilds the model),
  ``extra`` (JSON: e.g. the training step) and whatever the family needs to rebuild its
  architecture (checked against the tensors before anything is allocated).
* Files from elsewhere (``.pt``/``.pth`` state dicts, possibly wrapped under ``params``,
  ``model_state_dict``, ``state_dict`` or ``model``): the released LIQE checkpoint, pyiqa's
  ``liqe_mix.pt``. They carry no family; LIQE is assumed unless the caller names one.

This module imports no model: families import it, never the other way round.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from liqe_dist.files import atomic_path

FORMAT = "liqe-dist/weights-1"
DEFAULT_FAMILY = "liqe"  # project files written before families existed, and foreign files
_WRAPPER_KEYS = ("params", "model_state_dict", "state_dict", "model")
_PREFIXES = ("module.", "clip_model.", "clip.", "model.")
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


class CheckpointError(ValueError):
    """A weights file is unreadable or does not fit the model; the message names the file."""


def save_weights(model, path: str | Path, extra: dict | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (an :class:`~liqe_dist.models.base.IQAModel`) to ``path`` (safetensors).

    ``state``: ``state_dict()``-keyed tensors to write instead of the module's own (a bf16 run's
    float32 masters, :func:`liqe_dist.dist.engine.master_state_dict`). Written under a temporary
    name first, so an interrupted save never leaves a file that looks complete.
    """
    tensors, meta = model.weights_state(state)
    meta = {**meta, "format": FORMAT, "family": model.family, "extra": json.dumps(extra or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a weights file without its tensors (a safetensors header; other formats
    carry none): enough for :func:`file_family` when the tensors are loaded elsewhere."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


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
    if meta.get("format") != FORMAT:  # foreign files: strip the wrappers' prefixes
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


def file_family(meta: dict[str, str], path: str | Path) -> str:
    """The family a weight file's metadata names (project files), or :data:`DEFAULT_FAMILY`."""
    if meta.get("format") != FORMAT:
        return DEFAULT_FAMILY
    family = meta.get("family", DEFAULT_FAMILY)
    if not isinstance(family, str) or len(family) > 50:
        raise CheckpointError(f"{path}: malformed family name in the metadata")
    return family


def file_extra(meta: dict[str, str]) -> dict:
    """The ``extra`` JSON a project file carries (empty when absent or unreadable)."""
    try:
        extra = json.loads(meta.get("extra") or "{}")
    except ValueError:
        return {}
    return extra if isinstance(extra, dict) else {}


def check_fits(module: torch.nn.Module, state: dict[str, torch.Tensor], path, what: str) -> None:
    """``state`` holds every tensor ``module`` has, of the same shape, and nothing else; the
    error names the file. ``module`` may live on the meta device (nothing allocated)."""
    own = module.state_dict()
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
        raise CheckpointError(f"{path}: weights do not fit {what}: " + "; ".join(parts))


def load_weights(path: str | Path, family: str | None = None, **options):
    """The model a weight file holds, rebuilt by its family (named in the file, or ``family``
    for files from elsewhere). ``options`` go to the family's loader (LIQE: ``model_name``,
    ``vocabulary``, ``text_context``, ``quick_gelu`` for OpenAI-format files)."""
    from liqe_dist.models.registry import get_family

    state, meta = read_state_dict(path)
    named = file_family(meta, path)
    if family is not None and meta.get("format") == FORMAT and family != named:
        raise CheckpointError(f"{path}: holds a {named!r} model, not {family!r}")
    return get_family(family or named, where=f"{path}: family").from_weights(state, meta, path, **options)
