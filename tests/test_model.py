import math

import pytest
import torch
import torch.nn.functional as F

from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.models.liqe.model import LIQE, predictions_from_logits
from liqe_dist.models.registry import build_model
from liqe_dist.models.liqe.vocabulary import Vocabulary


def crops(b=2, u=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, u, 3, 224, 224, generator=g)


def test_forward_matches_equations_2_and_3(tiny_liqe):
    x = crops()
    with torch.no_grad():
        out = tiny_liqe(x)
        clip = tiny_liqe.clip
        # eq. 2 written out: mean over crops of cos(F_u, G_v), scaled by 1/tau_1 = exp(logit_scale)
        f = clip.encode_image(x.flatten(0, 1)).view(2, 3, -1)
        g = clip.encode_text(__import__("open_clip").tokenize(Vocabulary().prompts()))
        cos = torch.stack([torch.stack([F.cosine_similarity(f[b, u][None], g, dim=1) for u in range(3)]).mean(0)
                           for b in range(2)])
        logits = math.exp(4.0) * cos
    assert torch.allclose(out.logits, logits, atol=1e-4)
    joint = torch.softmax(logits, dim=1).view(2, 5, 9, 11)
    assert torch.allclose(out.joint, joint, atol=1e-6)
    assert torch.allclose(out.joint.sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-6)


def test_marginals_and_score(tiny_liqe):
    with torch.no_grad():
        out = tiny_liqe(crops())
    assert out.quality.shape == (2, 5) and out.scene.shape == (2, 9) and out.distortion.shape == (2, 11)
    for b in range(2):
        for c in range(5):
            assert out.quality[b, c] == pytest.approx(out.joint[b, c].sum().item(), abs=1e-6)
        assert out.score[b] == pytest.approx(sum((c + 1) * out.quality[b, c].item() for c in range(5)), abs=1e-5)


def test_predictions_by_hand():
    # all mass on (c=4 "perfect", s=2 "human", d=3 "blur")
    v = Vocabulary()
    logits = torch.full((1, 495), -1e4)
    logits[0, v.index(4, 2, 3)] = 0.0
    out = predictions_from_logits(logits, v)
    assert out.score.item() == pytest.approx(5.0)
    assert out.scene.argmax().item() == 2 and out.distortion.argmax().item() == 3
    # uniform joint: q_hat = (1+2+3+4+5)/5 = 3
    out = predictions_from_logits(torch.zeros(1, 495), v)
    assert out.score.item() == pytest.approx(3.0)
    assert torch.allclose(out.scene, torch.full((1, 9), 1 / 9))


def test_two_level_ablation_scores_in_1_2(tiny_clip):
    model = LIQE(tiny_clip, Vocabulary.for_tasks(levels=2)).eval()
    assert model.vocabulary.prompts()[0] == "a photo of a animal with jpeg2000 compression artifacts, which is of bad quality"
    assert model.vocabulary.prompts()[99] == "a photo of a animal with jpeg2000 compression artifacts, which is of good quality"
    with torch.no_grad():
        out = model(crops(1))
    assert out.joint.shape == (1, 2, 9, 11)
    p = torch.softmax(out.logits[0].double(), dim=0).view(2, 99).sum(dim=1)  # p(bad), p(good)
    assert out.score.item() == pytest.approx(1 * p[0].item() + 2 * p[1].item(), abs=1e-6)


def test_separate_templates_ablation_by_hand():
    v = Vocabulary(separate=True)
    prompts = v.prompts()
    assert v.size == len(prompts) == 5 + 9 + 11
    assert prompts[0] == "a photo with bad quality" and prompts[5] == "a photo of a animal"
    assert prompts[14] == "a photo with jpeg2000 compression artifacts"
    logits = torch.zeros(1, 25)
    logits[0, 3] = math.log(3.0)          # quality "good" 3x as likely as each other level
    logits[0, 5 + 2] = 50.0               # scene "human"
    logits[0, 14 + 10] = math.log(10.0)   # distortion "other" 10x as likely as each other type
    out = predictions_from_logits(logits, v)
    assert torch.allclose(out.quality, torch.tensor([[1, 1, 1, 3, 1]]) / 7.0)
    assert out.score.item() == pytest.approx((1 + 2 + 3 + 4 * 3 + 5) / 7.0)
    assert out.scene[0, 2].item() == pytest.approx(1.0)
    assert out.distortion[0, 10].item() == pytest.approx(10 / 20)
    # joint = product of the per-task softmaxes (independent tasks), so it sums to 1
    assert out.joint[0, 3, 2, 10].item() == pytest.approx(3 / 7 * 1.0 * 0.5, rel=1e-5)
    assert out.joint.sum().item() == pytest.approx(1.0)


def test_separate_templates_with_a_task_off(tiny_clip):
    v = Vocabulary.for_tasks(scene=False, separate=True)
    assert v.prompts()[5:] == [f"a photo with {d} artifacts" for d in v.distortions]
    model = LIQE(tiny_clip, v).eval()
    with torch.no_grad():
        out = model(crops(2))
    assert out.joint.shape == (2, 5, 1, 11) and torch.equal(out.scene, torch.ones(2, 1))
    assert torch.allclose(out.quality.sum(1), torch.ones(2)) and torch.allclose(out.distortion.sum(1), torch.ones(2))


def test_linear_head_ablation(tiny_clip_state):
    with pytest.raises(ValueError, match="model.tasks"):
        LIQEConfig(name="liqe-tiny", head="linear")
    model = build_model(LIQEConfig(name="liqe-tiny", head="linear", tasks=("quality",)))
    model.clip.load_state_dict(tiny_clip_state)
    x = crops(2)
    with torch.no_grad():
        out = model(x)
        emb = F.normalize(model.clip.encode_image(x.flatten(0, 1)), dim=-1).view(2, 3, -1).mean(1)
        expected = emb @ model.head.weight[0] + model.head.bias[0]
    assert torch.allclose(out.score, expected, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(n.startswith(("head.", "clip.visual.")) for n in trainable)


def test_logit_scale_frozen_by_default_and_encoders_trainable(tiny_clip):
    model = LIQE(tiny_clip).train()
    assert not model.clip.logit_scale.requires_grad
    assert "clip.logit_scale" not in dict(model.named_parameters())  # a buffer: no optimiser sees it
    assert "logit_scale" in model.clip.state_dict()
    out = model(crops(2, 1))
    out.score.sum().backward()
    assert model.clip.visual.conv1.weight.grad.abs().sum() > 0
    assert model.clip.token_embedding.weight.grad.abs().sum() > 0
    assert model.clip.logit_scale.grad is None
    trained = LIQE(tiny_clip, freeze_logit_scale=False)
    assert trained.clip.logit_scale.requires_grad and trained.clip.logit_scale.shape == (1,)


def test_text_embeddings_cached_at_inference_only(tiny_liqe, tiny_clip_state):
    with torch.no_grad():
        first = tiny_liqe.text_embeddings()
        assert tiny_liqe.text_embeddings() is first
        tiny_liqe.load_state_dict({f"clip.{k}": v for k, v in tiny_clip_state.items()})
        assert tiny_liqe.text_embeddings() is not first
    tiny_liqe.train()
    assert tiny_liqe._text_cache is None
    assert tiny_liqe.text_embeddings().requires_grad


def trained_like(model: LIQE, images: torch.Tensor) -> LIQE:
    """Give a random tiny model the spread a trained one has: its image embeddings move along
    the text embeddings' "perfect minus bad" direction with the image's content, and the logit
    scale is CLIP's trained 100. Its scores then spread over about one quality level across
    ``images``, where a random model's spread by 0.01."""
    with torch.no_grad():
        g = model.encode_prompts().view(5, 99, -1)
        w = g[4].mean(0) - g[0].mean(0)
        visual = model.clip.visual
        proj = visual.proj.detach().clone()
        visual.proj = None  # the pooled features before the projection
        feats = visual(images.flatten(0, 1)).view(*images.shape[:2], -1).mean(1)
        visual.proj = torch.nn.Parameter(proj)
        a = feats[0] - feats.mean(0)
        visual.proj.copy_(0.05 * proj + torch.outer(a / a.norm(), w / w.norm()))
        model.clip.logit_scale.fill_(math.log(100.0))
    model.clear_text_cache()
    return model


def test_bf16_model_close_to_fp32():
    from scipy.stats import spearmanr

    x = crops(8, 3)
    torch.manual_seed(0)
    fp32 = trained_like(build_model(LIQEConfig(name="liqe-tiny")).eval(), x)
    bf16 = build_model(LIQEConfig(name="liqe-tiny", precision="bf16")).eval()
    bf16.clip.load_state_dict(fp32.clip.state_dict())
    assert bf16.clip.visual.conv1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        a, b = fp32(x), bf16(x)
    assert b.score.dtype == torch.float32
    spread = (a.score.max() - a.score.min()).item()
    assert spread > 0.8  # predictions that differ, so that an error has room to show
    # bf16 keeps 8 bits of mantissa: measured 0.044 here (logit scale 100 amplifies it)
    assert (a.score - b.score).abs().max() < 0.08 * spread
    assert spearmanr(a.score, b.score)[0] > 0.95
    assert torch.equal(a.scene.argmax(1), b.scene.argmax(1))


def test_model_config_rejects_bad_values():
    with pytest.raises(ValueError, match="precision"):
        LIQEConfig(precision="fp16")
    with pytest.raises(ValueError, match="tasks"):
        LIQEConfig(tasks=("quality", "aesthetics"))
    with pytest.raises(ValueError, match="model.name: unknown model 'ViT-Q-99'"):
        LIQEConfig(name="ViT-Q-99")
    with pytest.raises(ValueError, match="model.checkpoint: no such file"):
        LIQEConfig(name="liqe-tiny", checkpoint="/nonexistent/w.safetensors")


def _deepspeed_bf16(model: LIQE) -> LIQE:
    """What DeepSpeed's bf16 engine does to a module: parameters to bf16, buffers untouched."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


def test_dtype_follows_the_vision_weights_and_uint8_crops_run_in_bf16(tiny_clip):
    """DeepSpeed casts parameters only: the frozen logit scale (a buffer) stays float32, so the
    model's dtype must come from the image tower, or float32 crops meet bf16 convolutions."""
    model = _deepspeed_bf16(LIQE(tiny_clip).eval())
    assert model.clip.logit_scale.dtype == torch.float32 and model.dtype == torch.bfloat16
    pixels = torch.randint(0, 256, (2, 2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        out = model(pixels)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.score).all()


def test_text_cache_is_kept_across_batches_in_bf16(tiny_clip, monkeypatch):
    model = _deepspeed_bf16(LIQE(tiny_clip).eval())
    calls = []
    encode = model.encode_prompts
    monkeypatch.setattr(model, "encode_prompts", lambda *a: calls.append(1) or encode(*a))
    pixels = torch.randint(0, 256, (1, 1, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        model(pixels)
        model(pixels)
    assert len(calls) == 1


def test_logit_scale_stays_float32_when_the_model_is_cast(tiny_clip):
    """ln 100 in bf16 is 4.594: exp gives 98.9, every logit 1.1 % small."""
    model = LIQE(tiny_clip)
    model.clip.logit_scale.fill_(math.log(100.0))
    model = model.to(torch.bfloat16)
    assert model.clip.logit_scale.dtype == torch.float32
    assert model.clip.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)
    assert torch.tensor(math.log(100.0)).bfloat16().float().exp().item() == pytest.approx(98.86, abs=0.01)


def test_cosines_and_the_linear_head_are_float32_in_bf16(tiny_clip_state):
    from liqe_dist.models.liqe.model import build_clip

    clip = build_clip("liqe-tiny")
    clip.load_state_dict(tiny_clip_state)
    model = _deepspeed_bf16(LIQE(clip, head="linear", vocabulary=Vocabulary.for_tasks(True, False, False)))
    emb = F.normalize(torch.randn(64, 1, model.clip.visual.output_dim), dim=-1)
    emb = emb + 1e-4 * torch.randn_like(emb)  # 64 nearly equal images: bf16 outputs would tie
    q = model.logits(emb, None)
    assert q.dtype == torch.float32 and q.unique().numel() == 64
