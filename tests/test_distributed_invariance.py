"""The invariant of DESIGN.md §3: one step on W ranks (real processes, gloo, DeepSpeed engines,
prompt sharding on, the full multitask loss) equals one step in one process on the union of the
ranks' batches: same loss, same gradients, same weight updates. Both loss recipes: the paper's
(one mean over all pairs) and the reference code's (per-dataset means, tie targets 1/2, Phi
without the extra sqrt 2), whose per-dataset normalisation must hold when a dataset's images
are spread over ranks."""

import pytest
import torch
import torch.multiprocessing as mp

from dist_workers import WEIGHTS, build_liqe, invariance_rank, make_problem
from liqe_dist.dist.local_group import free_local_port as free_port
from liqe_dist.dist.engine import OptimConfig, build_optimizer
from liqe_dist.models.liqe.losses import LossConfig
from liqe_dist.train.weighting import weighted_total
from liqe_dist.models.liqe.objective import step_losses

# eps = 1 makes Adam's first update ~ lr * g (not lr * sign(g)), so updates test gradient values;
# a large lr keeps updates far above the float32 rounding of the weights they are read from.
OPTIM = {"lr": 10.0, "eps": 1.0, "weight_decay": 1e-3}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("invariance")
    make_problem(workdir)
    return workdir


_SINGLE: dict = {}


def single_process(workdir, recipe: str) -> dict:
    """One step in one process on the whole batch (computed once per recipe)."""
    if recipe in _SINGLE:
        return _SINGLE[recipe]
    torch.manual_seed(0)
    model = build_liqe(workdir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, _ = build_optimizer(model, OptimConfig(**OPTIM), total_steps=10)
    batch = torch.load(workdir / "batch.pt", weights_only=True)
    terms, _ = step_losses(model, batch, loss=LossConfig(recipe))
    loss = weighted_total(terms, WEIGHTS)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    updates = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    _SINGLE[recipe] = {"loss": loss.detach(), "grads": grads, "updates": updates, "weights": weights,
                       "counts": {k: t.count for k, t in terms.items()}}
    return _SINGLE[recipe]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.slow
@pytest.mark.parametrize("world,stage,recipe", [(2, 0, "paper"), (3, 0, "paper"), (2, 1, "paper"), (3, 2, "paper"),
                                                (2, 0, "reference"), (3, 1, "reference")])
def test_one_step_equals_single_process(workdir, world, stage, recipe):
    ref = single_process(workdir, recipe)
    mp.spawn(invariance_rank, args=(world, free_port(), str(workdir), stage, OPTIM, recipe), nprocs=world, join=True)
    got = torch.load(workdir / f"result_{world}_{stage}_{recipe}.pt", weights_only=True)
    if recipe == "reference":
        assert got["counts"]["quality"] == 2  # both datasets, each weighing 1/2
    assert got["counts"] == ref["counts"]  # the same pairs and labelled samples, formed across ranks
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    if stage == 0:
        assert set(got["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            assert rel(got["grads"][name], g) <= 1e-5, name
    moved = 0
    for name, u in ref["updates"].items():
        if u.norm() > 0:
            moved += 1
            assert rel(got["updates"][name], u) <= 1e-5, name
        else:
            assert got["updates"][name].norm() == 0, name
    assert moved > 20  # both encoders were updated
    for name, w in ref["weights"].items():
        assert rel(got["weights"][name], w) <= 1e-5, name
    assert "clip.logit_scale" not in ref["updates"]  # frozen: a buffer, not a parameter


def test_the_recipes_differ_on_this_batch(workdir):
    """So that the reference runs above test something the paper runs do not."""
    assert single_process(workdir, "paper")["loss"].item() != pytest.approx(
        single_process(workdir, "reference")["loss"].item(), rel=1e-3)
