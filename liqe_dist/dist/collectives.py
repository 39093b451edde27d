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
