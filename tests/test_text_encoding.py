import open_clip
import torch
import torch.nn.functional as F

from liqe_dist.models.liqe.model import LIQE, build_clip
from liqe_dist.models.liqe.text_encoder import context_length_needed, cut_tokens, encode_tokens
from liqe_dist.models.liqe.vocabulary import Vocabulary


def test_cut_context_is_the_longest_prompt():
    tokens = open_clip.tokenize(Vocabulary().prompts())
    length = context_length_needed(tokens)
    assert 15 < length <= 24
    cut = cut_tokens(tokens)
    assert cut.shape == (495, length)
    assert (tokens[:, length:] == 0).all()  # nothing but padding was dropped
    assert (cut.argmax(dim=1) == tokens.argmax(dim=1)).all()  # end-of-text kept


def test_cut_context_equals_open_clip_encode_text(tiny_clip):
    tiny_clip.eval()
    tokens = open_clip.tokenize(Vocabulary().prompts())
    with torch.no_grad():
        full = tiny_clip.encode_text(tokens, normalize=True)
        cut = F.normalize(encode_tokens(tiny_clip, cut_tokens(tokens)), dim=-1)
    assert full.shape == cut.shape == (495, 64)
    assert torch.allclose(full, cut, atol=1e-5, rtol=0)
    # the prompts' embeddings really differ from each other (the check is not vacuous)
    assert (full[0] - full[494]).abs().max() > 1e-2


def test_cut_context_equals_full_on_vit_b32():
    torch.manual_seed(1)
    clip = build_clip("ViT-B-32").eval()
    prompts = Vocabulary().prompts()[::50]  # 10 prompts keep the full-size check quick
    tokens = open_clip.tokenize(prompts)
    with torch.no_grad():
        full = clip.encode_text(tokens, normalize=True)
        cut = F.normalize(encode_tokens(clip, cut_tokens(tokens)), dim=-1)
    rel = (full - cut).norm(dim=1) / full.norm(dim=1)
    assert rel.max() < 1e-5


def test_liqe_full_and_cut_context_agree(tiny_clip):
    with torch.no_grad():
        cut = LIQE(tiny_clip, text_context="cut").eval().encode_prompts()
        full = LIQE(tiny_clip, text_context="full").eval().encode_prompts()
    assert torch.allclose(cut, full, atol=1e-5)


def test_prompt_slices_concatenate_to_all(tiny_liqe):
    with torch.no_grad():
        whole = tiny_liqe.encode_prompts()
        parts = torch.cat([tiny_liqe.encode_prompts(0, 200), tiny_liqe.encode_prompts(200, 495)])
    assert torch.allclose(whole, parts, atol=1e-6)
