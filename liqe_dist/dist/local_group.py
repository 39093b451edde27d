"""A process group of ranks on this machine without Ray (tests and benchmarks spawn these;
training gets its group from Ray Train)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local_rank(rank: int, world: int, port: int, threads: int = 1, use_gpu: bool = False) -> None:
    """Join a process group of ``world`` processes on this machine (tests, benchmarks; training
    itself gets its group from Ray Train), with the environment DeepSpeed reads. With
    ``use_gpu`` rank r uses GPU r and the group has nccl for GPU tensors, gloo for CPU ones."""
    from liqe_dist.hardware import process_group_backend

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      DS_ACCELERATOR="cuda" if use_gpu else "cpu")
    if use_gpu:
        torch.cuda.set_device(rank)
    torch.set_num_threads(threads)
    dist.init_process_group(process_group_backend(use_gpu), rank=rank, world_size=world)
