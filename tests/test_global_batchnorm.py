"""Batch norm under data parallelism: GlobalBatchNorm2d on W ranks (real processes, gloo)
normalises with the statistics of the global batch, so outputs, gradients and running
statistics equal one process's on the union batch."""

import pytest
import torch
import torch.multiprocessing as mp

from dist_workers import bn_problem, global_bn_rank
from liqe_dist.dist.local_group import free_local_port
from liqe_dist.dist.batchnorm import use_global_batchnorm
from liqe_dist.models.liqe.model import build_clip

pytestmark = pytest.mark.slow  # real processes: seconds to a minute each


@pytest.mark.parametrize("world", [2, 3])
def test_global_batchnorm_equals_single_process(tmp_path, world):
    visual, images, loss_fn = bn_problem()
    out = visual(images)
    loss_fn(out).backward()
    mp.spawn(global_bn_rank, args=(world, free_local_port(), str(tmp_path)), nprocs=world, join=True)
    got = torch.load(tmp_path / f"bn_{world}.pt", weights_only=True)
    assert torch.allclose(got["out"], out, rtol=1e-12, atol=1e-12)
    checked = 0
    for name, p in visual.named_parameters():
        if p.grad.norm() > 1e-12:  # residual branches start dead (open_clip zero-inits their last BN)
            checked += 1
            assert ((got["grads"][name] - p.grad).norm() / p.grad.norm()).item() < 1e-10, name
    assert checked > 20
    for name, b in visual.named_buffers():
        if "running" in name:
            assert torch.allclose(got["buffers"][name], b, rtol=1e-12, atol=1e-14), name


def test_conversion_keeps_weights_and_state_dict_keys():
    torch.manual_seed(0)
    visual = build_clip("liqe-tiny-rn").visual
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    n_bn = sum(type(m) is torch.nn.BatchNorm2d for m in visual.modules())
    assert use_global_batchnorm(visual) == n_bn > 0
    after = visual.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    visual.eval()  # without a process group, and in eval mode, it is plain batch norm
    x = torch.randn(2, 3, 224, 224)
    plain = build_clip("liqe-tiny-rn").visual.eval()
    plain.load_state_dict(after)
    assert torch.equal(visual(x), plain(x))
