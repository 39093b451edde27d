"""Weights files: the project's format and the released LIQE / pyiqa formats.

The released checkpoints cannot be downloaded here, so the tests write files in the same
formats from random weights: an OpenAI-format CLIP state dict (the released LIQE.pt), the same
under "params" (pyiqa's liqe_mix.pt) and under "model_state_dict" (the reference's training
checkpoints). The tiny config uses QuickGELU like OpenAI's ViT-B/32.
"""

import pickle

import pytest
import torch

from liqe_dist import load
from liqe_dist.models.weights import CheckpointError, load_weights, read_state_dict, save_weights
from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.models.liqe.model import LIQE
from liqe_dist.models.registry import build_model
from liqe_dist.data.labels import VOCABULARY_VERSION
from liqe_dist.models.liqe.vocabulary import Vocabulary


def outputs(model, seed=0):
    x = torch.randn(2, 2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_project_format_round_trip(tmp_path, tiny_liqe):
    path = save_weights(tiny_liqe, tmp_path / "w.safetensors", extra={"step": 7})
    assert not (tmp_path / "w.safetensors.partial").exists()
    state, meta = read_state_dict(path)
    assert meta["vocabulary_version"] == VOCABULARY_VERSION and meta["model_name"] == "liqe-tiny"
    loaded = load_weights(path)
    assert torch.equal(outputs(loaded).logits, outputs(tiny_liqe).logits)


def test_project_format_keeps_the_vocabulary(tmp_path, tiny_clip):
    model = LIQE(tiny_clip, Vocabulary.for_tasks(scene=False, levels=2))
    loaded = load_weights(save_weights(model, tmp_path / "w.safetensors"))
    assert loaded.vocabulary == model.vocabulary and len(loaded.prompt_tokens) == 22
    separate = LIQE(tiny_clip, Vocabulary(separate=True))
    loaded = load_weights(save_weights(separate, tmp_path / "s.safetensors"))
    assert loaded.vocabulary.separate and len(loaded.prompt_tokens) == 25
    linear = LIQE(tiny_clip, Vocabulary.for_tasks(scene=False, distortion=False), head="linear")
    torch.nn.init.normal_(linear.head.weight)
    loaded = load_weights(save_weights(linear, tmp_path / "h.safetensors"))
    assert loaded.head is not None and torch.equal(loaded.head.weight, linear.head.weight)


@pytest.mark.parametrize("wrap", ["plain", "openai_jit_keys", "pyiqa", "reference_training", "ddp_prefix", "fp16"])
def test_released_formats(tmp_path, tiny_clip_state, tiny_liqe, wrap):
    state = dict(tiny_clip_state)
    if wrap == "openai_jit_keys":
        obj = {**state, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
               "vocab_size": torch.tensor(49408)}
    elif wrap == "pyiqa":
        obj = {"params": state}
    elif wrap == "reference_training":
        obj = {"epoch": 3, "model_state_dict": state, "optimizer_state_dict": {}}
    elif wrap == "ddp_prefix":
        obj = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "fp16":  # OpenAI's weights are partly half precision
        obj = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    else:
        obj = state
    path = tmp_path / "LIQE.pt"
    torch.save(obj, path)
    model = load_weights(path, model_name="liqe-tiny")
    got, want = outputs(model), outputs(tiny_liqe)
    tol = 2e-2 if wrap == "fp16" else 1e-6
    assert (got.score - want.score).abs().max() < tol
    assert model.vocabulary == Vocabulary()


def test_load_through_model_config_and_api(tmp_path, tiny_clip_state, tiny_liqe):
    path = tmp_path / "liqe_mix.pt"
    torch.save({"params": tiny_clip_state}, path)
    model = build_model(LIQEConfig(name="liqe-tiny", checkpoint=str(path)))
    assert torch.allclose(outputs(model).score, outputs(tiny_liqe).score, atol=1e-6)
    scorer = load("liqe-tiny", checkpoint=str(path))
    assert torch.allclose(outputs(scorer.model).score, outputs(tiny_liqe).score, atol=1e-6)


def test_wrong_architecture_is_named(tmp_path, tiny_clip_state):
    path = tmp_path / "LIQE.pt"
    torch.save(tiny_clip_state, path)
    with pytest.raises(CheckpointError, match=r"LIQE\.pt: weights do not fit model 'ViT-B-32'.*another shape"):
        load_weights(path, model_name="ViT-B-32")


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"params": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pt: cannot be read with torch.load\\(weights_only=True\\)"):
        read_state_dict(path)


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable safetensors file"):
        read_state_dict(bad)
    with pytest.raises(CheckpointError, match="missing.pt: no such checkpoint file"):
        read_state_dict(tmp_path / "missing.pt")
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_state_dict(empty)


# -- hostile project files: metadata is data, checked before anything is built ---------------------
def _rewrite_meta(src, dst, **changes):
    """A copy of safetensors file ``src`` with metadata entries replaced (what an attacker can do)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in changes.items()})
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_metadata_never_becomes_a_path(tmp_path, tiny_liqe, monkeypatch):
    import glob
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    good = save_weights(tiny_liqe, tmp_path / "w.safetensors")
    target = tmp_path / "victim"
    target.mkdir()
    evil = _rewrite_meta(good, tmp_path / "evil.safetensors", model_name=f"../../../../{target}/owned")
    before = set(glob.glob(str(tmp_path / "**"), recursive=True))
    loaded = load_weights(evil)  # the architecture comes from the (valid) embedded config
    assert torch.equal(outputs(loaded).logits, outputs(tiny_liqe).logits)
    assert set(glob.glob(str(tmp_path / "**"), recursive=True)) == before  # nothing written anywhere
    assert not list((tmp_path / "tmp").iterdir())  # and no temp folders left behind


@pytest.mark.parametrize("cfg_change,message", [
    ({"vision_cfg": {"layers": 200, "width": 16384, "patch_size": 32, "image_size": 224}}, r"parameters \(limit"),
    ({"vision_cfg": {"layers": 3, "width": 128, "head_width": 64, "patch_size": 32, "image_size": 224}}, "do not fit"),
    ({"vision_cfg": {"layers": 2, "width": 10**9, "patch_size": 32, "image_size": 224}}, "not an integer in"),
    ({"vision_cfg": {"timm_model_name": "vit_huge_patch14_224", "image_size": 224}}, "unsupported key"),
    ({"text_cfg": {"hf_model_name": "some/model"}}, "unsupported key"),
    ({"embed_dim": "64"}, "embed_dim = '64' is not an integer"),
])
def test_hostile_model_configs_are_refused_before_allocation(tmp_path, tiny_liqe, cfg_change, message):
    import json

    from safetensors import safe_open

    good = save_weights(tiny_liqe, tmp_path / "w.safetensors")
    with safe_open(str(good), framework="pt") as f:
        cfg = json.loads(f.metadata()["model_cfg"])
    cfg.update(cfg_change)
    evil = _rewrite_meta(good, tmp_path / "evil.safetensors", model_cfg=cfg)
    with pytest.raises(CheckpointError, match=message) as info:
        load_weights(evil)
    assert str(evil) in str(info.value)


@pytest.mark.slow
def test_an_oversize_declared_model_costs_no_memory(tmp_path, tiny_liqe):
    """A config declaring ~3 billion parameters over a tiny file fails at the shape check while
    the process stays small (building it first would need ~12 GB)."""
    import json
    import subprocess
    import sys

    from safetensors import safe_open

    good = save_weights(tiny_liqe, tmp_path / "w.safetensors")
    with safe_open(str(good), framework="pt") as f:
        cfg = json.loads(f.metadata()["model_cfg"])
    cfg["vision_cfg"].update(layers=48, width=2048, head_width=64)
    cfg["text_cfg"].update(layers=48, width=2048, heads=32)
    evil = _rewrite_meta(good, tmp_path / "evil.safetensors", model_cfg=cfg)
    script = (f"import resource\nfrom liqe_dist.models.weights import load_weights, CheckpointError\n"
              f"try:\n    load_weights({str(evil)!r})\nexcept CheckpointError as e:\n    print('refused', e)\n"
              f"print('maxrss_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    assert "refused" in out and "do not fit" in out, out
    assert int(out.split("maxrss_mb")[1]) < 2000, out


def test_an_oversize_saved_vocabulary_is_refused(tmp_path, tiny_liqe):
    good = save_weights(tiny_liqe, tmp_path / "w.safetensors")
    words = [f"w{i}" for i in range(300)]
    evil = _rewrite_meta(good, tmp_path / "evil.safetensors",
                         vocabulary={"qualities": words, "scenes": words, "distortions": words})
    with pytest.raises(CheckpointError, match=r"evil.safetensors: malformed liqe-dist metadata .*27000000 prompts"):
        load_weights(evil)
