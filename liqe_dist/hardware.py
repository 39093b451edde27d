"""What the machine runs natively: the CPU's model and flags, and whether bf16 is fast on a device.

bf16 is worth it only where the hardware computes in it natively: CUDA GPUs with bf16 support,
and CPUs with AVX512_BF16 or AMX. Elsewhere PyTorch emulates it: on an AMD EPYC without AVX-512
bf16 scoring measured 8x *slower* than fp32 (8.8 vs 1.1 s per image).
"""

from __future__ import annotations

import functools
import logging
import os
import platform

import torch

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
_SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo; the platform's name and no flags elsewhere."""
    name, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags" and flags is None:
                    flags = frozenset(value.split())
                if name is not None and flags is not None:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags or frozenset()


def describe() -> str:
    """One line for benchmark headers: CPU model, the flags that decide speed, torch's CPU path."""
    name, flags = cpu_info()
    shown = " ".join(f for f in _SHOWN_FLAGS if f in flags) or "none of " + "/".join(_SHOWN_FLAGS)
    line = f"CPU: {name}; flags: {shown}; torch CPU capability: {torch.backends.cpu.get_cpu_capability()}"
    if torch.cuda.is_available():
        line += f"; GPU: {torch.cuda.get_device_name()}"
    return line


#: Set to 1 or 0 to make this process treat its CPU as computing bf16 natively or not, whatever
#: its flags: how the test suite is run once per branch, proving no result depends on the CPU.
NATIVE_BF16_ENV = "LIQE_NATIVE_BF16"


def native_bf16(device: str = "cpu", cpu_flags: frozenset[str] | None = None, cuda_bf16: bool | None = None) -> bool:
    """Whether ``device`` computes bf16 natively (``cpu_flags``/``cuda_bf16`` override detection;
    without ``cpu_flags``, :data:`NATIVE_BF16_ENV` overrides the CPU's flags)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
    if cpu_flags is None and os.environ.get(NATIVE_BF16_ENV) in ("0", "1"):
        return os.environ[NATIVE_BF16_ENV] == "1"
    flags = cpu_info()[1] if cpu_flags is None else cpu_flags
    return any(f in flags for f in BF16_CPU_FLAGS)


def precision_name(dtype: torch.dtype) -> str:
    """``fp32``/``bf16`` for a model's compute dtype (the names configs and run records use)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).removeprefix("torch."))


_warned: set[str] = set()


def resolve_precision(requested: str, device: str = "cpu", cpu_flags: frozenset[str] | None = None,
                      cuda_bf16: bool | None = None) -> str:
    """``auto`` -> bf16 where it is native, fp32 elsewhere; an explicit bf16 on hardware that
    emulates it is kept, with one warning that it will be slower."""
    if requested not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {requested!r}")
    native = native_bf16(device, cpu_flags, cuda_bf16)
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16" and not native and device not in _warned:
        _warned.add(device)
        log.warning("bf16 requested on %s, which has no native bf16 (%s): it will run slower than fp32; "
                    "--precision auto picks the faster one", device, describe())
    return requested


# -- which device a job runs on ---------------------------------------------------------------

def resolve_device(requested: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; ``cuda``/``cuda:N`` without a GPU is
    an error naming the request (never a silent fall-back to the CPU)."""
    requested = str(requested)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r}: no CUDA GPU is visible to this process "
                             "(use --device cpu, or auto)")
        return torch.device(requested)
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be auto, cpu or cuda[:N], got {requested!r}")


def training_device(use_gpu: bool) -> torch.device:
    """The device of this data-parallel rank: the config's ``use_gpu`` decides, not what the
    machine happens to have (a CPU run on a GPU node stays a CPU run). On GPUs, rank-local
    GPU ``LOCAL_RANK`` (Ray Train and torchrun set it; Ray also narrows CUDA_VISIBLE_DEVICES)."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu is true but this worker sees no CUDA GPU")
    local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return torch.device("cuda", local)


def process_group_backend(use_gpu: bool) -> str:
    """nccl for tensors on GPUs plus gloo for CPU tensors (object collectives pickle through
    CPU tensors, and a stray CPU tensor then still works instead of failing on nccl)."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def select_accelerator(use_gpu: bool) -> str:
    """Make DeepSpeed use the accelerator the config asks for, even when it already picked one
    by probing the machine (it caches its choice per process). Returns its name."""
    name = "cuda" if use_gpu else "cpu"
    os.environ["DS_ACCELERATOR"] = name
    from deepspeed.accelerator import real_accelerator

    current = real_accelerator.ds_accelerator
    if current is None or current.device_name() != name:
        if use_gpu:
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        real_accelerator.set_accelerator(Accelerator())
    return name


def move_batch(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor on ``device`` (one copy per tensor, asynchronous from pinned
    memory); other entries (keys, counts) unchanged."""
    non_blocking = torch.device(device).type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
