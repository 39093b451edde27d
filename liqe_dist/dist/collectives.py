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


def exchange_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's ``n`` (one collective and one host read: pass sizes known from the config
    and :func:`shard_range` to the gathers instead where they are known)."""
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
    def forward(ctx, x: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
        sizes = sizes or exchange_sizes(x.shape[0], x.device)
        ctx.sizes, ctx.rank = sizes, rank()
        return torch.cat(_gather_padded(x, sizes))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def _check_sizes(x: torch.Tensor, sizes: list[int] | None) -> None:
    if sizes is not None and (len(sizes) != world_size() or sizes[rank()] != x.shape[0]):
        raise ValueError(f"rank {rank()}: gather sizes {sizes} do not fit {world_size()} ranks with "
                         f"{x.shape[0]} rows here")


def all_gather_cat(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (rank order), differentiably.

    ``sizes``: every rank's number of rows, when known (else exchanged: one more collective and
    a host read). Backward sums the gradient over ranks; see the module docstring for why that
    is exact. Without a process group it returns ``x``.
    """
    if not is_distributed() or world_size() == 1:
        return x
    _check_sizes(x, sizes)
    return _AllGatherCat.apply(x, sizes)


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
def all_gather_cat_nograd(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """:func:`all_gather_cat` for labels and other tensors that carry no gradient."""
    if not is_distributed() or world_size() == 1:
        return x
    _check_sizes(x, sizes)
    return torch.cat(_gather_padded(x, sizes or exchange_sizes(x.shape[0], x.device)))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; ``x`` is untouched). Identity without a process group."""
    if not is_distributed():
        return x.clone()
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def max_spread(x: torch.Tensor) -> torch.Tensor:
    """Elementwise max - min of ``x`` over ranks (float64, on ``x``'s device; one collective, no
    host read): zero where all ranks agree."""
    both = torch.cat([x.detach().double().flatten(), -x.detach().double().flatten()])
    if is_distributed():
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, neg_lo = both.chunk(2)
    return (hi + neg_lo).view_as(x)


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local_rank(rank: int, world: int, port: int, threads: int = 1, use_gpu: bool = False) -> None:
    """Join a process group of ``world`` processes on this machine (tests, benchmarks; training
    itself gets its group from Ray Train), with the environment DeepSpeed reads. With
    ``use_gpu`` rank r uses GPU r and the group has nccl for GPU tensors, gloo for CPU ones."""
    from .hardware import process_group_backend

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      DS_ACCELERATOR="cuda" if use_gpu else "cpu")
    if use_gpu:
        torch.cuda.set_device(rank)
    torch.set_num_threads(threads)
    dist.init_process_group(process_group_backend(use_gpu), rank=rank, world_size=world)



_LOW = (torch.bfloat16, torch.float16)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _LOW else x


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """Batch norm whose training-mode statistics are those of the global batch (all ranks),
    computed in float32 whatever the weights' dtype.

    Per-rank statistics (plain data parallelism) would make each rank normalise differently
    from one process on the union batch; ``SyncBatchNorm`` fixes that on GPUs only. Here the
    per-channel sums are summed over ranks with :func:`all_reduce_sum_grad`, so gradients follow
    the same exact rule as the rest of the objective, on gloo and nccl alike. Mean and variance
    take two passes (sum, then squared deviations) like the single-process kernel.

    Precision: statistics, normalisation and the affine transform run in float32 and the output
    is cast back to the input's dtype; the running statistics stay float32 buffers when the
    module is cast to bf16 (bf16 sums lose the count itself: 1764 rounds to 1760). Same
    parameters and buffers as ``BatchNorm2d``, so state dicts are interchangeable.
    """

    def _apply(self, fn, recurse=True):
        kept = {n: b for n, b in self._buffers.items() if n.startswith("running_") and b is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            if self._buffers[name].dtype in _LOW and old.dtype not in _LOW:
                self._buffers[name] = old.to(self._buffers[name].device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, _at_least_fp32(x)
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.training or not is_distributed() or world_size() == 1:
            return self._local(x, weight, bias).to(dtype)
        c = x.shape[1]
        count_here = torch.full((1,), x.numel() // c, dtype=x.dtype, device=x.device)
        totals = all_reduce_sum_grad(torch.cat([x.sum((0, 2, 3)), count_here]))
        count = totals[c].detach()
        mean = totals[:c] / count
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce_sum_grad((centred * centred).sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / self.num_batches_tracked.float()) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), factor)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if weight is not None:
            y = y * weight.view(1, c, 1, 1) + bias.view(1, c, 1, 1)
        return y.to(dtype)

    def _local(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """``BatchNorm2d.forward`` on float32 ``x`` with float32 weights (this rank's batch)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return torch.nn.functional.batch_norm(x, self.running_mean if keep else None,
                                              self.running_var if keep else None, weight, bias,
                                              use_batch, factor, self.eps)


def use_global_batchnorm(module: torch.nn.Module) -> int:
    """Turn every ``BatchNorm2d`` in ``module`` into a :class:`GlobalBatchNorm2d` in place
    (weights and running statistics kept, statistics float32); returns how many were converted.
    Done at every world size: the float32 statistics matter on one GPU too."""
    converted = 0
    for m in module.modules():
        if type(m) is torch.nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
            for name in ("running_mean", "running_var"):
                if m._buffers.get(name) is not None:
                    m._buffers[name] = _at_least_fp32(m._buffers[name])
            converted += 1
    return converted
