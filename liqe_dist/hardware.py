"""What the machine runs natively: the CPU's model and flags, and whether bf16 is fast on a device.

bf16 is worth it only where the hardware computes in it natively: CUDA GPUs with bf16 support,
and CPUs with AVX512_BF16 or AMX. Elsewhere PyTorch emulates it: on an AMD EPYC without AVX-512
bf16 scoring measured 8x *slower* than fp32 (8.8 vs 1.1 s per image).
"""

from __future__ import annotations

import functools
import logging
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


def native_bf16(device: str = "cpu", cpu_flags: frozenset[str] | None = None, cuda_bf16: bool | None = None) -> bool:
    """Whether ``device`` computes bf16 natively (``cpu_flags``/``cuda_bf16`` override detection)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
    flags = cpu_info()[1] if cpu_flags is None else cpu_flags
    return any(f in flags for f in BF16_CPU_FLAGS)


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
