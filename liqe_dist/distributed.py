"""Collectives for exact data-parallel LIQE.

The rule that keeps gradients exact: every rank computes the *same* global loss from tensors
all-gathered with :func:`all_gather_cat`, whose backward sums the incoming gradient over ranks
(a reduce-scatter). Rank r's own piece then receives ``W`` times the global gradient, and the
data-parallel average over ``W`` ranks (DeepSpeed's gradient all-reduce) brings it back to
exactly the gradient a single process would compute on the union of the ranks' batches. The same
holds for the prompt embeddings, which each rank encodes only a slice of.

Pieces may differ in length across ranks (495 prompts over 2 ranks, uneven last batches): they
are padded to the longest for the collective and trimmed after.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def shard_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of piece ``index`` when ``total`` items are split into ``parts`` nearly
    equal contiguous pieces (the first ``total % parts`` pieces get one more)."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def _sizes(n: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s.item()) for s in sizes]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    longest = max(sizes)
    padded = x
    if x.shape[0] < longest:
        padded = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return [piece[:n] for piece, n in zip(out, sizes)]


class _AllGatherCat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        sizes = _sizes(x.shape[0], x.device)
        ctx.sizes, ctx.rank = sizes, rank()
        return torch.cat(_gather_padded(x, sizes))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (rank order), differentiably.

    Backward sums the gradient over ranks; see the module docstring for why that is exact.
    Without a process group it returns ``x``.
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _AllGatherCat.apply(x)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of every rank's ``x`` (same shape on all ranks), differentiably; backward sums the
    gradient over ranks, the same rule as :func:`all_gather_cat` (one collective, not three)."""
    if not is_distributed() or world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


@torch.no_grad()
def all_gather_cat_nograd(x: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather_cat` for labels and other tensors that carry no gradient."""
    if not is_distributed() or world_size() == 1:
        return x
    return torch.cat(_gather_padded(x, _sizes(x.shape[0], x.device)))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; ``x`` is untouched). Identity without a process group."""
    if not is_distributed():
        return x.clone()
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def assert_same_on_all_ranks(x: torch.Tensor, what: str, atol: float = 0.0) -> None:
    """Raise if ``x`` differs between ranks (checked at run time, e.g. the DWA weights)."""
    if not is_distributed():
        return
    lo, hi = x.detach().double().clone(), x.detach().double().clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if (hi - lo).abs().max().item() > atol:
        raise RuntimeError(f"{what} differs across ranks (max spread {(hi - lo).abs().max().item():.3g})")


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local_rank(rank: int, world: int, port: int, threads: int = 1, backend: str = "gloo") -> None:
    """Join a process group of ``world`` processes on this machine (tests, benchmarks; training
    itself gets its group from Ray Train), with the environment DeepSpeed reads. With ``nccl``
    rank r uses GPU r."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      DS_ACCELERATOR="cuda" if backend == "nccl" else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world)



class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """Batch norm whose training-mode statistics are those of the global batch (all ranks).

    Per-rank statistics (plain data parallelism) would make each rank normalise differently
    from one process on the union batch; ``SyncBatchNorm`` fixes that on GPUs only. Here the
    per-channel sums are summed over ranks with :func:`all_reduce_sum_grad`, so gradients follow the same
    exact rule as the rest of the objective, on gloo and nccl alike. Mean and variance take two
    passes (sum, then squared deviations) like the single-process kernel. Same parameters and
    buffers as ``BatchNorm2d``, so state dicts are interchangeable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not is_distributed() or world_size() == 1:
            return super().forward(x)
        c = x.shape[1]
        local = torch.cat([x.sum((0, 2, 3)), x.new_tensor([x.numel() / c])])
        totals = all_reduce_sum_grad(local)
        count = totals[c].detach()
        mean = totals[:c] / count
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce_sum_grad((centred * centred).sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), factor)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def use_global_batchnorm(module: torch.nn.Module) -> int:
    """Turn every ``BatchNorm2d`` in ``module`` into a :class:`GlobalBatchNorm2d` in place
    (weights and running statistics kept); returns how many were converted."""
    converted = 0
    for m in module.modules():
        if type(m) is torch.nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
            converted += 1
    return converted
