"""The GPU path without a GPU: one training step, evaluation and scoring run on fake CUDA tensors.

The installed torch is a CUDA build, so ``FakeTensorMode`` can make tensors that say
``cuda:0`` and carry shapes, dtypes and devices but no data. Under it:

* a CPU tensor meeting a CUDA one raises (what a real GPU does: a batch never moved, a label
  tensor or a counter created on the CPU);
* a host read of a device value (``.item()``, ``.tolist()``, ``bool()``) raises: each would
  stall a GPU, so the audited code may contain none;
* a bf16 weight meeting a float32 input raises, as on a GPU.

Collectives are recorded (with every tensor's device) by a stand-in process group of two ranks
that copies this rank's data: gloo cannot carry fake tensors, and the values do not matter here;
the real collectives' values are proven by the invariance tests.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from shard_fixtures import pack_csv, write_csv_dataset
from liqe_dist.data.crops import CropConfig
from liqe_dist.dist.batchnorm import use_global_batchnorm
from liqe_dist.eval.shard_eval import batch_statistics
from liqe_dist.hardware import move_batch
from liqe_dist.train.weighting import weighted_total
from liqe_dist.models.liqe.model import LIQE, build_clip
from liqe_dist.models.liqe.objective import step_losses
from liqe_dist.train.loop import step_record

CUDA = torch.device("cuda", 0)


def to_fake_cuda(module: torch.nn.Module, mode: FakeTensorMode, param_dtype: torch.dtype) -> torch.nn.Module:
    """``module`` with its parameters as fake CUDA tensors in ``param_dtype`` and its buffers
    fake CUDA tensors in their own dtype: what DeepSpeed's bf16 engine makes of a model."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                with mode:
                    fake = mode.from_tensor(p.detach()).to(CUDA, param_dtype if p.is_floating_point() else p.dtype)
                sub._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                with mode:
                    sub._buffers[name] = mode.from_tensor(b).to(CUDA)
    return module


@contextlib.contextmanager
def recorded_collectives(world: int = 2, rank: int = 0):
    """A stand-in two-rank process group: collectives record their tensors and act as if every
    rank held this rank's data."""
    calls: list[tuple[str, list[torch.device]]] = []

    def record(name, tensors):
        calls.append((name, [t.device for t in tensors]))

    def all_reduce(t, op=None, group=None, async_op=False):
        record("all_reduce", [t])

    def all_gather(out, t, group=None, async_op=False):
        record("all_gather", [t, *out])
        for o in out:
            o.copy_(t)

    saved = {n: getattr(dist, n) for n in ("is_initialized", "get_world_size", "get_rank", "all_reduce", "all_gather")}
    dist.is_initialized, dist.get_world_size, dist.get_rank = (lambda: True), (lambda group=None: world), \
        (lambda group=None: rank)
    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    try:
        yield calls
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)


def labelled_batch(n: int = 3, crops: int = 2) -> dict:
    """A training batch as the data pipeline gives it (CPU, uint8 crops, label tensors)."""
    scenes = torch.zeros(n, 9)
    scenes[0, 2] = 1
    return {"images": torch.randint(0, 256, (n, crops, 3, 224, 224), dtype=torch.uint8),
            "dataset": torch.tensor([0, 0, 1])[:n], "mos": torch.tensor([1.0, 2.0, 3.0])[:n],
            "has_mos": torch.ones(n, dtype=torch.bool), "scenes": scenes, "has_scenes": scenes.sum(1) > 0,
            "distortion": torch.tensor([1, 2, -1])[:n], "has_distortion": torch.tensor([True, True, False])[:n],
            "keys": [f"k{i}" for i in range(n)], "skipped": 1}


@pytest.mark.parametrize("name", ["liqe-tiny", "liqe-tiny-rn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_training_step_stays_on_the_device_without_host_reads(name, dtype):
    """Forward, the three losses over the gathered global batch, and the step's bookkeeping of a
    rank of two, on a bf16 (or fp32) model on CUDA: no CPU tensor, no dtype clash, no host read,
    and every collective gets device tensors."""
    torch.manual_seed(0)
    model = LIQE(build_clip(name)).train()
    use_global_batchnorm(model)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    to_fake_cuda(model, mode, dtype)
    tasks = ("quality", "scene", "distortion")
    lam = {"quality": 1.0, "scene": 0.5, "distortion": 2.0}
    batch = labelled_batch()
    with recorded_collectives() as calls, mode:
        on_device = move_batch(batch, CUDA)
        terms, out = step_losses(model, on_device, tasks, rank_sizes=[3, 3])
        loss = weighted_total(terms, lam)
        record = step_record(loss, terms, on_device, lam, tasks, CUDA)
    assert out.score.shape == (6,) and out.score.device == CUDA and out.logits.dtype == torch.float32
    assert record.device == CUDA and record.shape == (1 + 2 * 3 + 2 + 3,)
    assert calls, "the step must gather across ranks"
    assert all(d == CUDA for _, devices in calls for d in devices), calls
    gathers = [devices for name, devices in calls if name == "all_gather"]
    assert len(gathers) == 1 + 1 + 7  # prompts, logits, 7 label tensors; no size exchanges
    if name == "liqe-tiny-rn":  # batch norm statistics all-reduced, in float32 whatever the weights
        assert sum(1 for n, _ in calls if n == "all_reduce") >= 2


def test_the_audit_catches_what_it_is_for():
    """The audit fails on the three faults it exists to catch: a batch left on the CPU, a label
    tensor created on the CPU, and a host read between forward and backward."""
    torch.manual_seed(0)
    model = to_fake_cuda(LIQE(build_clip("liqe-tiny")).train(), FakeTensorMode(allow_non_fake_inputs=True),
                         torch.bfloat16)
    mode = next(p for p in model.parameters()).fake_mode
    batch = labelled_batch()
    with recorded_collectives(), mode:
        with pytest.raises(Exception, match="device"):
            step_losses(model, batch, rank_sizes=[3, 3])  # not moved
        moved = move_batch(batch, CUDA)
        moved["dataset"] = torch.tensor([0, 0, 1])  # a CPU tensor reaching the gather
        with pytest.raises(Exception, match="device|cpu"):
            step_losses(model, moved, rank_sizes=[3, 3])
        terms, _ = step_losses(model, move_batch(batch, CUDA), rank_sizes=[3, 3])
        with pytest.raises(DataDependentOutputException):
            terms["quality"].count.item()


def test_evaluation_batches_stay_on_the_device(tmp_path):
    """A real evaluation batch (decoded from a packed shard set) through batch_statistics on a
    bf16 CUDA model: one copy in, the reductions on the device, the result a device tensor that
    the caller reads once."""
    from torch.utils.data import DataLoader

    from liqe_dist.data.stream import EvalSamples, collate_eval

    shard_dir = pack_csv(write_csv_dataset(tmp_path / "raw", n_refs=4, per_ref=2), tmp_path / "shards")
    loader = DataLoader(EvalSamples(shard_dir, 0, "train", CropConfig(eval_crops=2)), batch_size=3,
                        collate_fn=collate_eval)
    batch = next(iter(loader))
    assert batch["images"].dtype == torch.uint8
    torch.manual_seed(0)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = to_fake_cuda(LIQE(build_clip("liqe-tiny-rn")).eval(), mode, torch.bfloat16)
    use_global_batchnorm(model)
    batch = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}  # CPU, no data
    with mode, torch.inference_mode():
        stats = batch_statistics(model, batch, CUDA)
    assert stats.device == CUDA and stats.shape == (3, 4)


def test_scoring_batches_stay_on_the_device(monkeypatch):
    """Scorer.predict on a bf16 CUDA model: uint8 crops in, one [B, 5] device tensor out."""
    from liqe_dist.eval.scoring import Scorer

    import liqe_dist.eval.scoring

    monkeypatch.setattr(liqe_dist.eval.scoring, "resolve_device", torch.device)  # the fake device is the GPU here
    torch.manual_seed(0)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = to_fake_cuda(LIQE(build_clip("liqe-tiny")), mode, torch.bfloat16)
    pixels = mode.from_tensor(torch.randint(0, 256, (2, 3, 3, 224, 224), dtype=torch.uint8))
    with mode, torch.inference_mode():
        scorer = Scorer(model, device="cuda:0")
        rows = scorer.predict(pixels)
    assert rows.device == CUDA and rows.shape == (2, 5)
