"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder ``step-<N>/``:

* ``model.safetensors``: the model's weights (project format of its family, also loadable by
  ``liqe-dist score``);
* ``rank-<r>.pt``: that rank's optimizer state (a ZeRO partition under ZeRO-1/2), LR scheduler,
  task weighting, step, data seed and RNG states.

``rank-<r>.pt`` is read with ``torch.load(weights_only=True)``; the only non-tensor objects a
DeepSpeed ZeRO optimizer state holds (its loss scaler, stage enum and fragment addresses) are
allowed by name, nothing else is unpickled.

bf16 runs: the weights written are the optimizer's float32 master copy of every trained
parameter (gathered from the ZeRO partitions), not the bf16 module; the optimizer state is
whichever layout DeepSpeed's wrapper has (ZeRO 1/2 partitions, ``BF16_Optimizer``,
``FP16_UnfusedOptimizer`` at ZeRO 0) and is restored through that wrapper's own loader.
"""

from __future__ import annotations

import inspect
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from liqe_dist.config import ConfigError
from liqe_dist.dist.engine import master_state_dict
from liqe_dist.files import atomic_path
from liqe_dist.models.weights import load_weights, save_weights
from liqe_dist.outputs import mark, owned_by
from liqe_dist.provenance import CONFIG_FILE, read_config, write_config, write_run_record
from liqe_dist.train.config import RESUME_SAFE_KEYS, TrainConfig, resolved_config, resume_changes

log = logging.getLogger(__name__)


def _allow_deepspeed_types() -> None:
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return
    torch.serialization.add_safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": torch.tensor(np_state[2]),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}


def save_run_weights(engine, path: str | Path, rank: int, extra: dict | None = None) -> None:
    """Rank 0 writes the run's weights (the float32 masters under bf16); every rank must call."""
    state = master_state_dict(engine)
    if rank == 0:
        save_weights(engine.module, path, extra=extra, state=state)


def save_training_checkpoint(folder: str | Path, engine, scheduler, weighting, step: int, rank: int,
                             extra: dict | None = None) -> Path:
    """Write this rank's part of checkpoint ``folder/step-<step>`` (rank 0 also the weights).
    Every rank must call it (ZeRO partitions live on every rank)."""
    ckpt = Path(folder) / f"step-{step:08d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_run_weights(engine, ckpt / "model.safetensors", rank, extra={"step": step})
    state = {
        "step": torch.tensor(step),
        "optimizer": engine.optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "weighting": weighting.state_dict(),
        "rng": _rng_state(),
        "extra": extra or {},
    }
    with atomic_path(ckpt / f"rank-{rank}.pt") as tmp:
        torch.save(state, tmp)
    return ckpt


def check_resume(cfg: TrainConfig) -> None:
    """ConfigError when ``cfg``'s run folder holds checkpoints of a run whose recorded config
    (``config.yaml``) differs from ``cfg`` in anything but :data:`RESUME_SAFE_KEYS` (and a longer
    ``epochs``): resuming would continue the old run under new values. Each change is named."""
    run_dir = Path(cfg.run_dir)
    if not any((run_dir / "checkpoints").glob("step-*")):
        return
    old = read_config(run_dir)
    if old is None:
        log.warning("%s: resuming a run that recorded no %s (made by an older version): it cannot be checked "
                    "against this config", run_dir, CONFIG_FILE)
        return
    changes = resume_changes(old, resolved_config(cfg))
    if changes:
        raise ConfigError(f"{run_dir}: holds checkpoints of a run with another config, which would go on under new "
                          f"values: {'; '.join(changes)}. Only epochs (longer) and {', '.join(RESUME_SAFE_KEYS)} may "
                          f"change on a resume; train under another name or out_dir to start a new run")


def record_run(cfg: TrainConfig, **used) -> None:
    """Rank 0's record of the run in its folder: the resolved ``config.yaml`` and this start's
    entry in ``run.json`` (``used``: the precision, device and world size it runs with)."""
    write_config(cfg.run_dir, resolved_config(cfg))
    write_run_record(cfg.run_dir, **used)
    if not owned_by(cfg.run_dir, "train"):  # a later `liqe-dist train` knows the folder as a run's
        mark(cfg.run_dir, "train")


def latest_checkpoint(folder: str | Path, world: int) -> Path | None:
    """The newest ``step-*`` folder under ``folder`` that every rank finished writing."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for ckpt in sorted(folder.glob("step-*"), reverse=True):
        if (ckpt / "model.safetensors").exists() and all((ckpt / f"rank-{r}.pt").exists() for r in range(world)):
            return ckpt
    return None


def load_training_checkpoint(ckpt: str | Path, engine, scheduler, weighting, rank: int, world: int) -> dict:
    """Restore model, this rank's optimizer state, scheduler, weighting and RNG; returns the
    rank file's contents (``step``, ``extra``)."""
    ckpt = Path(ckpt)
    _allow_deepspeed_types()
    state = torch.load(ckpt / f"rank-{rank}.pt", map_location="cpu", weights_only=True)
    restore_weights(engine.module, load_weights(ckpt / "model.safetensors", family=engine.module.family))
    opt = engine.optimizer
    if "state_dict_list" in inspect.signature(opt.load_state_dict).parameters:
        # ZeRO 1/2 and BF16_Optimizer: one entry per data-parallel rank, this rank's partition
        parts = [state["optimizer"] if r == rank else None for r in range(world)]
        opt.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)
    else:  # torch's optimizer (fp32, ZeRO 0) or FP16_UnfusedOptimizer (bf16, ZeRO 0: masters inside)
        opt.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    weighting.load_state_dict(state["weighting"])
    set_rng_state(state["rng"])
    return state


def restore_weights(module: torch.nn.Module, saved: torch.nn.Module) -> None:
    """Copy ``saved``'s parameters and buffers into ``module`` (same family and architecture).
    A tensor may differ in shape only where its elements agree (LIQE's logit scale is ``[]``
    in files and ``[1]`` when trained)."""
    own = module.state_dict()
    state = {k: v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() else v
             for k, v in saved.state_dict().items()}
    module.load_state_dict(state, strict=True)


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    ckpts = sorted(Path(folder).glob("step-*"))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
