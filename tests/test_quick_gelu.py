"""A pretrained model must run the activation its weights were trained with: OpenAI's CLIPs
were trained with QuickGELU, open_clip's ViT-B-32 config has plain GELU, and open_clip only
warns. Resolved from model name + tag without downloading anything; and a model built for
``pretrained: openai`` through open_clip's real loading path (weights from an offline Hugging
Face cache laid out as open_clip downloads it) has QuickGELU modules and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from liqe_dist.config import ConfigError, from_dict
from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.models.liqe.model import resolve_quick_gelu


@pytest.mark.parametrize("name,tag,expected", [
    ("ViT-B-32", "openai", True),        # the config lacks quick_gelu; the weights need it
    ("ViT-B-16", "openai", True),
    ("RN50", "openai", True),
    ("ViT-B-32-quickgelu", None, True),  # the config has it
    ("ViT-B-32", "laion2b_s34b_b79k", False),
    ("ViT-B-32", None, False),           # random weights: the config's own
])
def test_activation_resolves_from_name_and_tag(name, tag, expected):
    assert resolve_quick_gelu(name, tag) is expected


def test_forcing_plain_gelu_on_openai_weights_is_an_error():
    assert resolve_quick_gelu("ViT-B-32", None, True) is True
    with pytest.raises(ValueError, match="use QuickGELU"):
        resolve_quick_gelu("ViT-B-32", "openai", False)
    with pytest.raises(ConfigError, match="model: model.quick_gelu is false"):
        from_dict(LIQEConfig, {"name": "ViT-B-32", "pretrained": "openai", "quick_gelu": False}, prefix="model")


@pytest.mark.slow
def test_model_built_for_openai_weights_runs_quick_gelu(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    # open_clip fetches ViT-B-32/openai from the hub as timm/vit_base_patch32_clip_224.openai;
    # put a file there in the hub cache's layout so that its own loading code finds it offline.
    hub = tmp_path / "hub"
    snapshot = hub / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (hub / "models--timm--vit_base_patch32_clip_224.openai" / "refs").mkdir()
    (hub / "models--timm--vit_base_patch32_clip_224.openai" / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    state = open_clip.create_model("ViT-B-32").state_dict()
    marker = state["visual.proj"][0, :4].clone()
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "open_clip_model.safetensors"))
    del state
    script = textwrap.dedent(f"""
        import torch, open_clip
        from torch import nn
        from liqe_dist.models.liqe.config import LIQEConfig
        from liqe_dist.models.registry import build_model
        model = build_model(LIQEConfig(name="ViT-B-32", pretrained="openai"))
        acts = [type(m).__name__ for m in model.modules() if isinstance(m, (nn.GELU, open_clip.transformer.QuickGELU))]
        assert acts and set(acts) == {{"QuickGELU"}}, set(acts)
        assert torch.equal(model.clip.visual.proj[0, :4], torch.tensor({marker.tolist()})), "weights not loaded"
        print("ok", len(acts))
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok 24")  # 12 image + 12 text transformer blocks
