"""LIQE: CLIP image/text embeddings -> joint softmax over (quality, scene, distortion).

Shapes: B images, U crops per image, V prompts (495 by default), K embedding width.

    crops [B, U, 3, 224, 224] --image encoder--> F [B, U, K] (unit norm)
    prompts [V, L] tokens    --text encoder-->  G [V, K]    (unit norm)
    logit(c,s,d|x) = exp(logit_scale) * mean_u F_u . G_v          [B, V]   (eq. 2, scaled by 1/tau_1)
    p(c,s,d|x) = softmax over V                                   [B, C, S, D] (eq. 3)
    marginals by summing the joint; q_hat = sum_c p(c|x) * c in [1, C] (eq. 1)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from liqe_dist.data.crops import normalise
from liqe_dist.data.labels import VOCABULARY_VERSION
from liqe_dist.models.base import IQAModel, LossTerm, Prediction
from liqe_dist.models.liqe.losses import PAPER, LossConfig
from liqe_dist.models.liqe.objective import step_losses
from liqe_dist.models.liqe.text_encoder import cut_tokens, encode_tokens
from liqe_dist.models.liqe.vocabulary import TASKS, Vocabulary

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

HEAD_PREFIX = "liqe_head."  # weight files: the linear head of ablation (6), next to CLIP's own keys


@dataclass
class LIQEOutput:
    """Predictions for B images. Probabilities are float32 whatever the model's precision."""

    logits: torch.Tensor      # [B, V] scaled cosine similarities
    joint: torch.Tensor       # [B, C, S, D] joint probability (eq. 3)
    quality: torch.Tensor     # [B, C]  p(c|x)
    scene: torch.Tensor       # [B, S]  p(s|x)
    distortion: torch.Tensor  # [B, D]  p(d|x)
    score: torch.Tensor       # [B]     q_hat(x) = sum_c p(c|x) c, in [1, C] (eq. 1)


def predictions_from_logits(logits: torch.Tensor, vocabulary: Vocabulary) -> LIQEOutput:
    """Joint softmax, marginals and q_hat from scaled logits ``[B, V]``.

    With separate templates (ablation 4) each task has its own softmax over its own prompts and
    ``joint`` is the product of the three (the tasks are independent under that model).
    """
    logits = logits.float()
    if vocabulary.separate:
        sizes = [len(vocabulary.qualities), len(vocabulary.scenes), len(vocabulary.distortions)]
        # a task that is off has no prompts: its axis has size 1 and probability 1
        quality, scene, distortion = (part.softmax(dim=-1) if n else logits.new_ones(logits.shape[0], 1)
                                      for part, n in zip(logits.split(sizes, dim=-1), sizes))
        joint = quality[:, :, None, None] * scene[:, None, :, None] * distortion[:, None, None, :]
    else:
        joint = logits.softmax(dim=-1).view(-1, *vocabulary.shape)
        quality, scene, distortion = joint.sum(dim=(2, 3)), joint.sum(dim=(1, 3)), joint.sum(dim=(1, 2))
    values = torch.arange(1, quality.shape[1] + 1, dtype=quality.dtype, device=quality.device)
    return LIQEOutput(logits=logits, joint=joint, quality=quality, scene=scene, distortion=distortion,
                      score=quality @ values)


def regression_outputs(scores: torch.Tensor) -> LIQEOutput:
    """:class:`LIQEOutput` of a model that regresses quality directly (``scores`` ``[B, 1]``):
    ``score`` is the regressed value (unbounded); the task distributions are trivial."""
    scores = scores.float()
    ones = scores.new_ones(scores.shape[0], 1)
    return LIQEOutput(logits=scores, joint=ones.view(-1, 1, 1, 1), quality=ones, scene=ones, distortion=ones,
                      score=scores[:, 0])


def freeze_text_encoder(model: "LIQE") -> None:
    """Stop training everything but the image encoder (and the linear head, when there is one):
    ablation (3) of Table 4, and the text side that ablation (6) does not use."""
    visual = {id(p) for p in model.clip.visual.parameters()}
    for p in model.clip.parameters():
        if id(p) not in visual:
            p.requires_grad_(False)


class LIQE(IQAModel):
    """LIQE around an open_clip CLIP model (``self.clip``).

    ``head="linear"`` is ablation (6) of Table 4: the image encoder with a fully connected layer
    on the crop-averaged embedding that regresses quality directly; no prompts are used.

    Training options (not weights; :meth:`configure_training`): the loss recipe, whether each
    rank encodes only its share of the prompts, and a frozen text encoder (ablation 3), whose
    prompt embeddings are then encoded once.
    """

    family = "liqe"

    def __init__(self, clip: nn.Module, vocabulary: Vocabulary | None = None,
                 text_context: Literal["cut", "full"] = "cut", freeze_logit_scale: bool = True,
                 tokenizer=None, head: Literal["prompts", "linear"] = "prompts"):
        super().__init__()
        self.clip = clip
        self.vocabulary = vocabulary or Vocabulary()
        self.head = nn.Linear(clip.visual.output_dim, 1) if head == "linear" else None
        if self.head is not None:
            freeze_text_encoder(self)
        tokenizer = tokenizer or open_clip.tokenize
        tokens = tokenizer(self.vocabulary.prompts())
        if text_context == "cut":
            tokens = cut_tokens(tokens)
        self.register_buffer("prompt_tokens", tokens, persistent=False)
        set_logit_scale_trainable(self.clip, not freeze_logit_scale)
        self._text_cache: torch.Tensor | None = None
        self.configure_training()

    def configure_training(self, loss: LossConfig = PAPER, shard_prompts: bool = True,
                           freeze_text: bool = False) -> "LIQE":
        """Set how :meth:`training_losses` trains (see the class docstring)."""
        self.loss_cfg, self.shard_prompts, self.freeze_text = loss, shard_prompts, freeze_text
        if freeze_text:
            freeze_text_encoder(self)
        self._fixed_text: torch.Tensor | None = None
        return self

    # -- the family seam ------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(name for name, on in zip(TASKS, self.vocabulary.tasks) if on)

    @property
    def heads(self) -> dict[str, tuple[str, ...]]:
        if not self.uses_prompts:
            return {}
        return {name: labels for name, labels in (("scene", self.vocabulary.scenes),
                                                  ("distortion", self.vocabulary.distortions)) if labels}

    def training_losses(self, batch: dict, rank_sizes: list[int] | None = None) -> dict[str, LossTerm]:
        """The fidelity losses (eqs. 4-10) over the global batch; see :mod:`.objective`."""
        text_emb = None
        if self.freeze_text and self.uses_prompts:
            if self._fixed_text is None:  # frozen: the same every step
                with torch.no_grad():
                    self._fixed_text = self.encode_prompts()
            text_emb = self._fixed_text
        terms, _ = step_losses(self, batch, self.tasks, self.shard_prompts, text_emb, self.loss_cfg, rank_sizes)
        return terms

    def predict(self, images: torch.Tensor) -> Prediction:
        """q_hat in [1, C] (C = 5: the 1-5 scale; the linear head's regressed value) and the
        scene and distortion marginals."""
        out = self(images)
        heads = {"scene": out.scene, "distortion": out.distortion}
        return Prediction(quality=out.score, heads={k: heads[k] for k in self.heads})

    def weights_state(self, state: dict[str, torch.Tensor] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """CLIP's tensors under open_clip/OpenAI names (and the linear head under
        :data:`HEAD_PREFIX`), and metadata that rebuilds the architecture, vocabulary and text
        context (read back by :func:`liqe_dist.models.liqe.weights.from_weights`)."""
        state = self.state_dict() if state is None else state
        cfg = getattr(self.clip, "liqe_model_cfg", None) or open_clip.get_model_config(self.model_name)
        v = self.vocabulary
        meta = {
            "model_name": self.model_name,
            "model_cfg": json.dumps(cfg) if cfg else "",
            "quick_gelu": json.dumps(uses_quick_gelu(self.clip)),
            "vocabulary": json.dumps({"qualities": v.qualities, "scenes": v.scenes, "distortions": v.distortions,
                                      "separate": v.separate}),
            "vocabulary_version": VOCABULARY_VERSION,
            "text_context": "full" if self.prompt_tokens.shape[1] == _context(self.clip) else "cut",
            "head": "prompts" if self.head is None else "linear",
        }
        tensors = {k.removeprefix("clip."): v for k, v in state.items() if k.startswith("clip.")}
        tensors["logit_scale"] = tensors["logit_scale"].reshape(())  # [1] when it was trained
        if self.head is not None:
            tensors.update({f"{HEAD_PREFIX}{k.removeprefix('head.')}": v for k, v in state.items()
                            if k.startswith("head.")})
        return tensors, meta

    @property
    def model_name(self) -> str:
        """The open_clip name the CLIP was built as (set by :func:`build_clip` and the loaders)."""
        name = getattr(self.clip, "liqe_model_name", None)
        if not name:
            raise ValueError("this CLIP's architecture is unknown (build it with liqe_dist.models.liqe.model.build_clip)")
        return name

    # -- encoders ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The dtype the image tower computes in (its weights'; DeepSpeed's bf16 casts
        parameters, not buffers, so a buffer would not tell)."""
        return next(self.clip.visual.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.clip.visual.parameters()).device

    def encode_images(self, crops: torch.Tensor) -> torch.Tensor:
        """Crops ``[B, U, 3, H, W]`` -> unit-norm embeddings ``[B, U, K]`` float32.

        uint8 crops (what the data pipeline gives) are normalised here, on their device; float
        crops are taken as normalised already. The tower runs in :attr:`dtype`; the
        normalisation of its output is float32 (bf16 would round every cosine to 2^-9).
        """
        b, u = crops.shape[:2]
        x = crops.flatten(0, 1)
        x = normalise(x, self.dtype) if x.dtype == torch.uint8 else x.to(self.dtype)
        feats = self.clip.encode_image(x)
        return F.normalize(feats.float(), dim=-1).view(b, u, -1)

    def encode_prompts(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Unit-norm embeddings ``[stop - start, K]`` float32 of prompts ``start:stop`` (all by
        default). A slice lets each data-parallel rank encode only its share of the prompts.
        """
        tokens = self.prompt_tokens[start:stop]
        return F.normalize(encode_tokens(self.clip, tokens).float(), dim=-1)

    def text_embeddings(self) -> torch.Tensor:
        """All prompt embeddings ``[V, K]``; computed once and cached when not training."""
        if self.training or torch.is_grad_enabled():
            return self.encode_prompts()
        if self._text_cache is None:
            self._text_cache = self.encode_prompts()
        return self._text_cache

    def clear_text_cache(self) -> None:
        self._text_cache = None

    def train(self, mode: bool = True) -> "LIQE":
        self._text_cache = None  # weights may change while training
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        """A device or dtype change; a frozen logit scale (a buffer) stays float32 whatever the
        weights' dtype: ln 100 in bf16 is 4.594, whose exp (98.9) makes every logit 1.1 % small."""
        self._text_cache = None
        scale = self.clip._buffers.get("logit_scale")
        super()._apply(fn, recurse)
        if scale is not None and self.clip.logit_scale.dtype != scale.dtype:
            self.clip._buffers["logit_scale"] = scale.to(self.clip.logit_scale.device)
        return self

    # -- scoring ----------------------------------------------------------------------------
    @property
    def uses_prompts(self) -> bool:
        return self.head is None

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor | None) -> torch.Tensor:
        """``[B, U, K]`` x ``[V, K]`` -> scaled logits ``[B, V]``, averaged over crops (eq. 2);
        with the linear head, the regressed quality ``[B, 1]`` (``text_emb`` unused)."""
        if self.head is not None:  # float32: bf16 would quantise q_hat to 1/64 and make ties
            h = self.head
            return F.linear(image_emb.float().mean(dim=1), h.weight.float(), h.bias.float())
        cos = (image_emb.float() @ text_emb.float().t()).mean(dim=1)  # float32: cheap, and sensitive
        return self.clip.logit_scale.float().exp() * cos

    def predictions(self, logits: torch.Tensor) -> LIQEOutput:
        """:class:`LIQEOutput` from :meth:`logits` (of one rank's images or all ranks')."""
        if self.head is not None:
            return regression_outputs(logits)
        return predictions_from_logits(logits, self.vocabulary)

    def forward(self, crops: torch.Tensor, text_emb: torch.Tensor | None = None) -> LIQEOutput:
        """Crops ``[B, U, 3, 224, 224]`` -> :class:`LIQEOutput`. ``text_emb`` overrides the prompts'
        embeddings (e.g. all-gathered across ranks)."""
        if text_emb is None and self.uses_prompts:
            text_emb = self.text_embeddings()
        return self.predictions(self.logits(self.encode_images(crops), text_emb))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._text_cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def set_logit_scale_trainable(clip: nn.Module, trainable: bool) -> None:
    """Make CLIP's logit scale (1/tau_1) a buffer when frozen, a 1-element parameter when trained.

    A frozen scale is not a parameter at all, so optimisers and DeepSpeed never see it; the
    state-dict key and 0-dim shape stay the same, so checkpoints load either way. A trained one
    has shape [1] because DeepSpeed cannot broadcast 0-dim parameters.
    """
    value = clip.logit_scale.detach().reshape(()).clone()
    del clip.logit_scale
    if trainable:
        clip.logit_scale = nn.Parameter(value.reshape(1))
    else:
        clip.register_buffer("logit_scale", value)


def resolve_quick_gelu(name: str, pretrained: str | None = None, requested: bool | None = None) -> bool:
    """Whether model ``name`` with weights ``pretrained`` must run QuickGELU.

    Weights must run with the activation they were trained with, and open_clip only warns when
    they do not (its ``ViT-B-32`` config has plain GELU, OpenAI's weights were trained with
    QuickGELU). QuickGELU is used when the model config says so (``-quickgelu`` names), when
    open_clip's record of the pretrained tag says so, and for every ``openai`` tag (OpenAI
    trained all its CLIPs with it). ``requested`` True forces it; False where the weights need
    it is an error (the model would silently be another function).
    """
    cfg = open_clip.get_model_config(name) or {}
    needed_by = None
    if cfg.get("quick_gelu"):
        needed_by = f"model config {name!r}"
    elif pretrained and not Path(pretrained).is_file():
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
        if pretrained.lower() == "openai" or tag_cfg.get("quick_gelu"):
            needed_by = f"pretrained weights {pretrained!r} of {name!r}"
    if requested is False and needed_by:
        raise ValueError(f"model.quick_gelu is false, but {needed_by} use QuickGELU; "
                         "remove model.quick_gelu to use the activation the weights were trained with")
    return bool(requested) or needed_by is not None


def build_clip(name: str, pretrained: str | None = None, quick_gelu: bool | None = None) -> nn.Module:
    """An open_clip model by name, weights from ``pretrained`` (a tag or file) or random, with
    the activation :func:`resolve_quick_gelu` gives."""
    if name not in open_clip.list_models():
        known = ", ".join(m for m in open_clip.list_models() if m.startswith(("ViT-B", "ViT-L", "liqe")))
        raise ValueError(f"unknown model name {name!r} (e.g. {known})")
    kwargs = {"force_quick_gelu": True} if resolve_quick_gelu(name, pretrained, quick_gelu) else {}
    try:
        clip = open_clip.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot build {name!r} with pretrained={pretrained!r}: {exc}") from exc
    clip.liqe_model_name = name  # weight files record it
    return clip


def _context(clip) -> int:
    pos = clip.positional_embedding if hasattr(clip, "positional_embedding") else clip.text.positional_embedding
    return pos.shape[0]


def uses_quick_gelu(clip) -> bool:
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in clip.modules())
