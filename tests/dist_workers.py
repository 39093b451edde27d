"""Code that runs inside spawned ranks (real processes, gloo, real DeepSpeed engines)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from liqe_dist.dist.local_group import init_local_rank

TENSOR_LABELS = ("dataset", "mos", "has_mos", "scenes", "has_scenes", "distortion", "has_distortion")


def init_rank(rank: int, world: int, port: int) -> None:
    init_local_rank(rank, world, port, threads=1)


def make_problem(workdir: Path, n: int = 7, crops: int = 2, seed: int = 0, name: str = "liqe-tiny") -> None:
    """A fixed initial model and global batch: two datasets interleaved (pairs cross ranks),
    a MOS tie, an image without scene labels, one without a distortion label."""
    from liqe_dist.models.liqe.model import build_clip

    torch.manual_seed(seed)
    clip = build_clip(name)
    torch.save(clip.state_dict(), workdir / "init.pt")
    g = torch.Generator().manual_seed(seed)
    scenes = torch.zeros(n, 9)
    for i in range(n):
        scenes[i, (i * 2) % 9] = 1
        if i % 3 == 0:
            scenes[i, (i + 4) % 9] = 1
    scenes[5] = 0
    batch = {
        "images": torch.randn(n, crops, 3, 224, 224, generator=g),
        "dataset": torch.tensor([0, 1, 0, 1, 0, 1, 1])[:n],
        "mos": torch.tensor([3.0, 70.0, 1.5, 20.0, 3.0, 55.0, 40.0])[:n],
        "has_mos": torch.ones(n, dtype=torch.bool),
        "scenes": scenes, "has_scenes": scenes.sum(1) > 0,
        "distortion": torch.tensor([3, 0, 2, -1, 10, 5, 8])[:n],
    }
    batch["has_distortion"] = batch["distortion"] >= 0
    torch.save(batch, workdir / "batch.pt")


WEIGHTS = {"quality": 1.0, "scene": 0.7, "distortion": 1.3}


def build_liqe(workdir: Path, name: str = "liqe-tiny"):
    from liqe_dist.models.liqe.model import LIQE, build_clip

    clip = build_clip(name)
    clip.load_state_dict(torch.load(workdir / "init.pt", weights_only=True))
    return LIQE(clip).train()


def invariance_rank(rank: int, world: int, port: int, workdir: str, stage: int, optim_kwargs: dict,
                    recipe: str = "paper") -> None:
    """One DeepSpeed step on this rank's slice of the global batch; rank 0 saves the result."""
    from liqe_dist.dist.collectives import shard_range
    from liqe_dist.dist.engine import OptimConfig, build_engine
    from liqe_dist.models.liqe.losses import LossConfig
    from liqe_dist.train.weighting import weighted_total
    from liqe_dist.models.liqe.objective import step_losses

    workdir = Path(workdir)
    init_rank(rank, world, port)
    batch = torch.load(workdir / "batch.pt", weights_only=True)
    start, stop = shard_range(batch["images"].shape[0], world, rank)
    local = {k: v[start:stop] for k, v in batch.items()}
    model = build_liqe(workdir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, _, _ = build_engine(model, OptimConfig(zero_stage=stage, **optim_kwargs), total_steps=10)
    terms, _ = step_losses(engine.module, local, loss=LossConfig(recipe))
    loss = weighted_total(terms, WEIGHTS)
    engine.backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()
             if p.grad is not None} if stage == 0 else {}
    engine.step()
    updates = {n: p.detach() - before[n] for n, p in engine.module.named_parameters()}
    if rank == 0:
        weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads, "updates": updates, "weights": weights,
                    "counts": {k: t.count for k, t in terms.items()}}, workdir / f"result_{world}_{stage}_{recipe}.pt")
    dist.barrier()
    dist.destroy_process_group()


def train_rank(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    """Run the training loop on this rank (as Ray Train or torchrun would)."""
    from liqe_dist.config import from_dict
    from liqe_dist.train.config import TrainConfig
    from liqe_dist.train.loop import train_worker

    init_rank(rank, world, port)
    train_worker(from_dict(TrainConfig, cfg_dict))
    dist.destroy_process_group()


def bn_problem(seed: int = 0):
    """A ResNet image tower with batch norm (float64, so only the method's error shows), a batch
    of 7 images and a loss that is nonlinear in the whole batch's output."""
    from liqe_dist.models.liqe.model import build_clip

    torch.manual_seed(seed)
    visual = build_clip("liqe-tiny-rn").visual.double().train()
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(7, 3, 224, 224, generator=g, dtype=torch.float64)
    target = torch.randn(7, visual.output_dim, generator=g, dtype=torch.float64)
    return visual, images, lambda out: (out * target).sum() ** 2


def global_bn_rank(rank: int, world: int, port: int, workdir: str) -> None:
    """Rank ``rank``'s share of :func:`bn_problem` through GlobalBatchNorm2d; gradients averaged
    over ranks as data parallelism does; rank 0 saves them with the running statistics."""
    from liqe_dist.dist.collectives import all_gather_cat, shard_range
    from liqe_dist.dist.batchnorm import use_global_batchnorm

    init_local_rank(rank, world, port, threads=1)
    visual, images, loss_fn = bn_problem()
    assert use_global_batchnorm(visual) > 0
    start, stop = shard_range(images.shape[0], world, rank)
    out = all_gather_cat(visual(images[start:stop]))
    loss_fn(out).backward()
    grads = {}
    for name, p in visual.named_parameters():
        dist.all_reduce(p.grad)
        grads[name] = p.grad / world
    if rank == 0:
        buffers = {n: b for n, b in visual.named_buffers() if "running" in n}
        torch.save({"out": out.detach(), "grads": grads, "buffers": buffers}, Path(workdir) / f"bn_{world}.pt")
    dist.barrier()
    dist.destroy_process_group()


def train_configs_rank(rank: int, world: int, port: int, cfg_dicts: list[dict]) -> None:
    """Run the training loop for several configs one after the other in the same ranks."""
    from liqe_dist.config import from_dict
    from liqe_dist.train.config import TrainConfig
    from liqe_dist.train.loop import train_worker

    init_rank(rank, world, port)
    for cfg_dict in cfg_dicts:
        train_worker(from_dict(TrainConfig, cfg_dict))
    dist.destroy_process_group()


def bf16_rank(rank: int, world: int, port: int, workdir: str, name: str, stage: int, precision: str) -> None:
    """One step of ``name`` in ``precision`` on this rank's slice of the problem; rank 0 saves the
    float32 master weights after it, the loss and what the engine runs. Then the step's
    checkpoint is written, a fresh engine restores it, and its masters are compared."""
    from liqe_dist.train.state import load_training_checkpoint, master_state_dict, save_training_checkpoint
    from liqe_dist.dist.collectives import shard_range
    from liqe_dist.dist.batchnorm import use_global_batchnorm
    from liqe_dist.dist.engine import OptimConfig, build_engine
    from liqe_dist.hardware import move_batch
    from liqe_dist.train.weighting import weighted_total
    from liqe_dist.models.liqe.objective import step_losses
    from liqe_dist.train.weighting import WeightingConfig, build_weighting

    workdir = Path(workdir)
    init_rank(rank, world, port)
    batch = torch.load(workdir / "batch.pt", weights_only=True)
    start, stop = shard_range(batch["images"].shape[0], world, rank)
    cfg = OptimConfig(zero_stage=stage, precision=precision, lr=1e-3, eps=1.0)

    def engine_for():
        model = build_liqe(workdir, name)
        use_global_batchnorm(model)
        return build_engine(model, cfg, total_steps=10)

    engine, _, sched = engine_for()
    local = move_batch({k: v[start:stop] for k, v in batch.items()}, engine.device)
    terms, _ = step_losses(engine.module, local)
    loss = weighted_total(terms, WEIGHTS)
    engine.backward(loss)
    engine.step()
    masters = master_state_dict(engine)
    weighting = build_weighting(WeightingConfig(), tuple(WEIGHTS), 10, 1)
    save_training_checkpoint(workdir / f"ckpt-{world}", engine, sched, weighting, 1, rank)
    dist.barrier()
    fresh, _, fresh_sched = engine_for()
    load_training_checkpoint(workdir / f"ckpt-{world}" / "step-00000001", fresh, fresh_sched, weighting, rank, world)
    restored = master_state_dict(fresh)
    module = engine.module
    bn = [m for m in module.modules() if type(m).__name__ == "GlobalBatchNorm2d"]
    if rank == 0:
        torch.save({"loss": loss.detach().float(), "masters": masters,
                    "restored_equal": all(torch.equal(restored[k], masters[k]) for k in masters),
                    "wrapper": type(engine.optimizer).__name__, "comm": str(engine.communication_data_type),
                    "param_dtype": str(module.dtype), "scale_dtype": str(module.clip.logit_scale.dtype),
                    "bn_stats_dtypes": sorted({str(m.running_mean.dtype) for m in bn})},
                   workdir / f"bf16_{world}_{precision}.pt")
    dist.barrier()
    dist.destroy_process_group()


def cpu_engine_on_a_cuda_machine_rank(rank: int, world: int, port: int, out: str) -> None:
    """build_engine with use_gpu false where torch reports a GPU (patched: there is none here)."""
    from liqe_dist.dist.engine import OptimConfig, build_engine
    from liqe_dist.models.liqe.model import LIQE, build_clip

    init_rank(rank, world, port)
    torch.cuda.is_available = lambda: True
    engine, _, _ = build_engine(LIQE(build_clip("liqe-tiny")), OptimConfig(precision="auto"), 10, use_gpu=False)
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm import comm

    torch.save({"device": str(engine.device), "bf16": engine.bfloat16_enabled(),
                "accelerator": get_accelerator().device_name(),
                "param_dtype": str(engine.module.dtype),
                "shm_op_built": comm.cdb.shm_comm_op is not None,
                "all_gather": comm.cdb.all_gather_function.__name__}, out)
    dist.destroy_process_group()


FAMILY_WEIGHTS = {"liqe": WEIGHTS, "pmt_iqa": {"classification": 0.6, "regression": 1.4},
                  "pmt_reference": {"classification": 0.9602831644731372, "regression": 0.9419036108703593}}
PMT_TINY = {"width": 8}
#: PMT-IQA's reference regime: one dataset (BID), raw labels, the public code's class rule.
PMT_REFERENCE = {**PMT_TINY, "recipe": "reference", "class_datasets": ("bid",), "target_range": (0.0, 5.0)}


def build_family(workdir: Path, family: str):
    """The problem's initial model of ``family`` (:func:`make_problem`, :func:`make_pmt_init`),
    built as training builds it: batch norm converted to its global form."""
    from liqe_dist.dist.batchnorm import use_global_batchnorm

    if family == "liqe":
        return build_liqe(workdir)
    from liqe_dist.models.pmt_iqa.config import PMTIQAConfig
    from liqe_dist.models.pmt_iqa.model import PMTIQA

    model = PMTIQA(PMTIQAConfig(**(PMT_REFERENCE if family == "pmt_reference" else PMT_TINY)))
    model.load_state_dict(torch.load(workdir / "pmt_init.pt", weights_only=True))
    use_global_batchnorm(model)
    return model.double().train()  # float64: 50 layers of batch norm on 14 crops amplify float32 rounding


def make_pmt_init(workdir: Path, seed: int = 0) -> None:
    """A fixed initial PMT-IQA (tiny width) and the problem batch's MOS scaled per dataset."""
    from liqe_dist.data.stream import unit_mos
    from liqe_dist.models.pmt_iqa.config import PMTIQAConfig
    from liqe_dist.models.pmt_iqa.model import PMTIQA

    torch.manual_seed(seed)
    torch.save(PMTIQA(PMTIQAConfig(**PMT_TINY)).state_dict(), workdir / "pmt_init.pt")
    batch = torch.load(workdir / "batch.pt", weights_only=True)
    batch["mos_unit"] = unit_mos(batch["mos"], batch["dataset"], [(1.0, 3.0), (20.0, 70.0)])
    torch.save(batch, workdir / "batch.pt")
    torch.save({**batch, "images": batch["images"].double()}, workdir / "batch64.pt")
    # The reference regime's batch: one dataset (BID, MOS 0..5) whose batch norm statistics are
    # the global batch's; MOS on the class edges (2.5 -> 5, 5.0 -> 10 clipped to 9).
    bid = torch.tensor([3.0, 4.9, 1.5, 2.5, 3.0, 5.0, 0.4])[:batch["mos"].shape[0]]
    torch.save({**batch, "images": batch["images"].double(), "dataset": torch.zeros_like(batch["dataset"]),
                "mos": bid, "mos_unit": bid / 5.0}, workdir / "batch64_reference.pt")


def problem_batch(family: str) -> str:
    return {"pmt_iqa": "batch64.pt", "pmt_reference": "batch64_reference.pt"}.get(family, "batch.pt")


def seam_step(model, batch: dict, family: str, step):
    """One step through the family seam: ``training_losses`` -> weighted total -> backward/step."""
    from liqe_dist.train.weighting import weighted_total

    terms = model.training_losses(batch)
    loss = weighted_total(terms, FAMILY_WEIGHTS[family])
    step(loss)
    return loss, terms


def seam_invariance_rank(rank: int, world: int, port: int, workdir: str, family: str, stage: int | None,
                         optim_kwargs: dict) -> None:
    """:func:`invariance_rank` for any family, through ``IQAModel.training_losses`` only;
    ``stage`` None: plain torch (float64 models), gradients averaged over ranks as DeepSpeed does."""
    from liqe_dist.dist.collectives import shard_range
    from liqe_dist.dist.engine import OptimConfig, build_engine

    workdir = Path(workdir)
    init_rank(rank, world, port)
    batch = torch.load(workdir / problem_batch(family), weights_only=True)
    start, stop = shard_range(batch["images"].shape[0], world, rank)
    local = {k: v[start:stop] for k, v in batch.items()}
    model = build_family(workdir, family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    if stage is None:  # DeepSpeed reduces float32/bf16 gradients only: its data-parallel mean by hand
        from liqe_dist.dist.engine import build_optimizer

        opt, _ = build_optimizer(model, OptimConfig(**optim_kwargs), total_steps=10)

        def step(loss):
            loss.backward()
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
            opt.step()
    else:
        engine, _, _ = build_engine(model, OptimConfig(zero_stage=stage, **optim_kwargs), total_steps=10)
        model = engine.module

        def step(loss):
            engine.backward(loss)
            if stage == 0:
                grads.update({n: p.grad.detach().clone() for n, p in engine.module.named_parameters()
                              if p.grad is not None})
            engine.step()

    loss, terms = seam_step(model, local, family, step)
    updates = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads, "updates": updates,
                    "counts": {k: t.count for k, t in terms.items()}},
                   workdir / f"seam_{family}_{world}_{stage}.pt")
    dist.barrier()
    dist.destroy_process_group()


def optimizer_reset_rank(rank: int, world: int, port: int, out: str, stage: int) -> None:
    """Two Adam steps, a reset, a third step; and a fresh engine started from the weights after
    two steps taking that third step: rank 0 saves both models' parameters after it."""
    from liqe_dist.dist.engine import OptimConfig, build_engine, reset_optimizer_state, torch_optimizer

    init_rank(rank, world, port)
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    cfg = OptimConfig(optimizer="adam", lr=0.1, weight_decay=1e-3, schedule="constant", zero_stage=stage,
                      precision="fp32")

    def step(engine):
        loss = ((engine.module(x) - y) ** 2).mean()
        engine.backward(loss)
        engine.step()

    torch.manual_seed(1)
    a, _, _ = build_engine(nn.Linear(5, 1), cfg, total_steps=10)
    step(a)
    step(a)
    after_two = {k: v.detach().clone() for k, v in a.module.state_dict().items()}
    reset_optimizer_state(a.optimizer)
    empty = not any(len(s) for s in torch_optimizer(a.optimizer).state.values())
    step(a)
    fresh_module = nn.Linear(5, 1)
    fresh_module.load_state_dict(after_two)
    b, _, _ = build_engine(fresh_module, cfg, total_steps=10)
    step(b)
    torch.manual_seed(1)
    c, _, _ = build_engine(nn.Linear(5, 1), cfg, total_steps=10)  # three steps without the reset
    for _ in range(3):
        step(c)
    if rank == 0:
        torch.save({"reset": dict(a.module.state_dict()), "fresh": dict(b.module.state_dict()),
                    "kept": dict(c.module.state_dict()), "after_two": after_two, "empty": empty}, Path(out))
    dist.barrier()
    dist.destroy_process_group()


def pmt_bf16_evaluation_rank(rank: int, world: int, port: int, workdir: str) -> None:
    """A bf16 PMT-IQA engine after one step: the module evaluation runs (float32, the masters)
    against the engine's bf16 module; rank 0 saves both predictions and the masters."""
    from liqe_dist.dist.batchnorm import use_global_batchnorm
    from liqe_dist.dist.collectives import shard_range
    from liqe_dist.dist.engine import OptimConfig, build_engine, evaluation_module, master_state_dict
    from liqe_dist.models.pmt_iqa.config import PMTIQAConfig
    from liqe_dist.models.pmt_iqa.model import PMTIQA
    from liqe_dist.train.weighting import weighted_total

    workdir = Path(workdir)
    init_rank(rank, world, port)
    batch = torch.load(workdir / "batch.pt", weights_only=True)
    start, stop = shard_range(batch["images"].shape[0], world, rank)
    model = PMTIQA(PMTIQAConfig(**PMT_TINY))
    model.load_state_dict(torch.load(workdir / "pmt_init.pt", weights_only=True))
    use_global_batchnorm(model)
    engine, _, _ = build_engine(model.train(), OptimConfig(zero_stage=1, precision="bf16", lr=1e-3), total_steps=10)
    local = {k: v[start:stop] for k, v in batch.items()}
    engine.backward(weighted_total(engine.module.training_losses(local), FAMILY_WEIGHTS["pmt_iqa"]))
    engine.step()
    masters = master_state_dict(engine)
    evaluated = evaluation_module(engine, lambda: PMTIQA(PMTIQAConfig(**PMT_TINY))).eval()
    engine.module.eval()
    images = batch["images"][:3]
    with torch.no_grad():
        full, low = evaluated.predict(images).quality, engine.module.predict(images).quality
    if rank == 0:
        torch.save({"full": full, "low": low, "masters": masters, "dtype": str(evaluated.dtype),
                    "engine_dtype": str(engine.module.dtype),
                    "state": {k: v.detach().clone() for k, v in evaluated.state_dict().items()}},
                   workdir / f"pmt_bf16_eval_{world}.pt")
    dist.barrier()
    dist.destroy_process_group()
