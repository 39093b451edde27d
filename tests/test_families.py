"""The model-family seam: both families train through ``IQAModel.training_losses`` with the same
exactness (one step on W ranks equals one process on the union batch), are picked by
``model.family`` in configs and weight files, and nothing else in the loop names a family."""

import ast
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dist_workers import build_family, make_pmt_init, make_problem, problem_batch, seam_invariance_rank, seam_step
from liqe_dist.config import ConfigError, from_dict
from liqe_dist.dist.engine import OptimConfig, build_optimizer
from liqe_dist.dist.local_group import free_local_port
from liqe_dist.models.registry import FAMILY_MODULES, get_family
from liqe_dist.train.config import TrainConfig

OPTIM = {"lr": 10.0, "eps": 1.0, "weight_decay": 1e-3}  # as test_distributed_invariance: updates ~ lr * g
PACKAGE = Path(__file__).resolve().parents[1] / "liqe_dist"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seam")
    make_problem(workdir)
    make_pmt_init(workdir)
    return workdir


_SINGLE: dict = {}


def single_process(workdir, family: str) -> dict:
    if family not in _SINGLE:
        torch.manual_seed(0)
        model = build_family(workdir, family)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt, _ = build_optimizer(model, OptimConfig(**OPTIM), total_steps=10)

        def step(loss):
            loss.backward()
            opt.step()

        batch = torch.load(workdir / problem_batch(family), weights_only=True)
        loss, terms = seam_step(model, batch, family, step)
        _SINGLE[family] = {"loss": loss.detach(), "counts": {k: t.count for k, t in terms.items()},
                           "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                     if p.grad is not None},
                           "updates": {n: p.detach() - before[n] for n, p in model.named_parameters()}}
    return _SINGLE[family]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.slow
@pytest.mark.parametrize("family,world,stage", [("liqe", 2, 0), ("liqe", 3, 1), ("pmt_iqa", 2, None),
                                                ("pmt_iqa", 3, None), ("pmt_reference", 2, None),
                                                ("pmt_reference", 3, None)])
def test_one_step_through_the_seam_equals_single_process(workdir, family, world, stage):
    """PMT-IQA's batch norm normalises with the global batch's statistics (GlobalBatchNorm2d),
    its L1 and cross-entropy sums are all-reduced with gradient. It runs in float64, as the batch
    norm test does: in float32 the stem's gradient differs by ~1 % after 50 layers of batch norm
    over 14 crops (rounding, amplified), which would hide a real error of that size. DeepSpeed
    reduces float32/bf16 gradients only, so these ranks average gradients as it does, by hand;
    PMT-IQA under DeepSpeed is trained by test_trainer.py."""
    ref = single_process(workdir, family)
    mp.spawn(seam_invariance_rank, args=(world, free_local_port(), str(workdir), family, stage, OPTIM),
             nprocs=world, join=True)
    got = torch.load(workdir / f"seam_{family}_{world}_{stage}.pt", weights_only=True)
    assert got["counts"] == ref["counts"]
    tol = 1e-9 if family.startswith("pmt") else 1e-5  # float64 / float32
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=tol)
    if stage in (0, None):
        assert set(got["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            assert rel(got["grads"][name], g) <= tol, name
    moved = 0
    for name, u in ref["updates"].items():
        if u.norm() > 0:
            moved += 1
            assert rel(got["updates"][name], u) <= tol, name
    assert moved > 20


def test_pmt_counts_every_crop_with_a_mos(workdir):
    ref = single_process(workdir, "pmt_iqa")
    assert {k: int(v) for k, v in ref["counts"].items()} == {"classification": 14, "regression": 14}  # 7 x 2 crops


def test_config_family_picks_the_section_type_and_names_bad_keys():
    data = {"datasets": [{"name": "a", "shards": "shards/a"}]}
    assert from_dict(TrainConfig, data).model.family == "liqe"  # the default family
    pmt = from_dict(TrainConfig, {**data, "model": {"family": "pmt_iqa", "width": 8},
                                  "weighting": {"method": "progressive"}})
    assert type(pmt.model).__name__ == "PMTIQAConfig" and pmt.model.width == 8
    with pytest.raises(ConfigError, match=r"model.family: expected one of \['liqe', 'pmt_iqa'\], got 'hyper'"):
        from_dict(TrainConfig, {**data, "model": {"family": "hyper"}})
    with pytest.raises(ConfigError, match="unknown key model.name"):
        from_dict(TrainConfig, {**data, "model": {"family": "pmt_iqa", "name": "ViT-B-32"}})
    with pytest.raises(ConfigError, match="weighting.easy: task 'classification' is not one this model trains"):
        from_dict(TrainConfig, {**data, "weighting": {"method": "progressive"}})  # LIQE has no such task
    with pytest.raises(ConfigError, match=r"crops.size \(256\) must equal model.crop_size \(224\)"):
        from_dict(TrainConfig, {**data, "model": {"family": "pmt_iqa"}, "crops": {"size": 256}})


def test_registry_lists_the_families_and_refuses_others():
    assert sorted(FAMILY_MODULES) == ["liqe", "pmt_iqa"]
    for name in FAMILY_MODULES:
        spec = get_family(name)
        assert spec.name == name and spec.config().family == name
    with pytest.raises(ValueError, match="unknown model family 'hyper' .known: liqe, pmt_iqa"):
        get_family("hyper")


def test_generic_code_names_no_family():
    """Trainer, evaluation, scoring, checkpoints and the launcher import no family's module:
    everything goes through the registry and the IQAModel protocol."""
    generic = [*(PACKAGE / "train").glob("*.py"), *(PACKAGE / "eval").glob("*.py"), *(PACKAGE / "run").glob("*.py"),
               *(PACKAGE / "dist").glob("*.py"), PACKAGE / "models" / "weights.py", PACKAGE / "models" / "base.py"]
    for path in generic:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    assert not name.startswith(("liqe_dist.models.liqe", "liqe_dist.models.pmt_iqa")), \
                        f"{path.relative_to(PACKAGE)} imports {name}"
