"""Batch norm that is exact under data parallelism: statistics of the global batch, in float32."""

from __future__ import annotations

import torch

from liqe_dist.dist.collectives import all_reduce_sum_grad, is_distributed, world_size

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
