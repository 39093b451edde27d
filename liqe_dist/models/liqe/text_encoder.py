"""Prompt encoding at the prompts' real context length.

CLIP's text transformer is causal and pools at the end-of-text token, so the output at that
token depends only on the tokens before it. Cutting the context from 77 to the longest prompt
(about 24 BPE tokens for LIQE's prompts), with the positional embedding and causal mask cut to
match, gives the same embeddings as open_clip's ``encode_text`` in a fraction of the time.
"""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
from torch import nn


@dataclass
class _TextParts:
    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    attn_mask: torch.Tensor | None
    text_projection: torch.Tensor | nn.Module | None
    pool_type: str
    eos_id: int | None


def _text_parts(clip: nn.Module) -> _TextParts:
    """The text tower's pieces, for open_clip's CLIP and for CustomTextCLIP's TextTransformer."""
    if isinstance(getattr(clip, "text", None), open_clip.transformer.TextTransformer):
        t = clip.text
        if t.cls_emb is not None:
            raise NotImplementedError("text towers with an appended CLS token (CoCa) are not supported")
        return _TextParts(t.token_embedding, t.positional_embedding, t.transformer, t.ln_final,
                          t.attn_mask, t.text_projection, t.pool_type, getattr(t, "eos_id", None))
    if hasattr(clip, "token_embedding") and hasattr(clip, "transformer"):
        return _TextParts(clip.token_embedding, clip.positional_embedding, clip.transformer,
                          clip.ln_final, clip.attn_mask, clip.text_projection,
                          clip.text_pool_type, getattr(clip, "text_eos_id", None))
    raise NotImplementedError(f"{type(clip).__name__}: only open_clip text transformers are supported")


def context_length_needed(tokens: torch.Tensor) -> int:
    """Smallest context that holds every prompt up to and including its last non-pad token."""
    nonzero = (tokens != 0).int()
    last = nonzero.shape[1] - 1 - nonzero.flip(1).argmax(dim=1)
    return int(last.max().item()) + 1


def cut_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens ``[N, 77]`` -> ``[N, L]`` with L the longest prompt (padding after it dropped)."""
    return tokens[:, : context_length_needed(tokens)].contiguous()


def encode_tokens(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Text features ``[N, K]`` (not normalised) for tokens ``[N, L]``, L <= the model's context.

    Equals ``clip.encode_text`` on the same prompts padded to the full context.
    """
    p = _text_parts(clip)
    length = tokens.shape[1]
    if length > p.positional_embedding.shape[0]:
        raise ValueError(f"{length} tokens exceed the model's context {p.positional_embedding.shape[0]}")
    cast_dtype = p.transformer.get_cast_dtype()
    x = p.token_embedding(tokens).to(cast_dtype)
    x = x + p.positional_embedding[:length].to(cast_dtype)
    mask = None if p.attn_mask is None else p.attn_mask[:length, :length]
    x = p.transformer(x, attn_mask=mask)
    x = p.ln_final(x)
    x = open_clip.transformer.text_global_pool(x, tokens, p.pool_type, eos_token_id=p.eos_id)
    if p.text_projection is not None:
        x = p.text_projection(x) if isinstance(p.text_projection, nn.Module) else x @ p.text_projection
    return x
