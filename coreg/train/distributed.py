"""Data-parallel Co-Reg under ``torchrun``: process group, row chunks, collectives, global BatchNorm.

How a distributed run stays equal to a single-process run on the same global batch:

* Every rank holds the full (uint8) training set and iterates the same seeded loaders, so every
  rank sees the same global batch; rank r forwards only its contiguous chunk of the rows.
* BatchNorm layers are replaced by :class:`GlobalBatchNorm2d`, which normalises with the
  statistics of the whole global batch (two autograd all-reduces), as ``nn.SyncBatchNorm``
  does on GPUs (it refuses CPU tensors, which is why this one exists).
* Each rank's loss is its share of the global loss (row sums divided by global row counts),
  gradients are summed across ranks, so the summed gradient is the global-batch gradient.
* Everything that couples rows (targets, MixMatch permutation and lambda, contrastive set,
  prototype EMA, queue) is computed from all-gathered rows, identically on every rank.
* The per-epoch prediction pass is sharded: each rank predicts its contiguous chunk of the
  training samples and the chunks are all-gathered, so every rank holds the same predictions
  and derives the same GMM split. The validation hit rate is computed by every rank and rank
  0's value is broadcast, so every rank selects the same epoch even where GPU kernels are not
  bit-reproducible.

Only rank 0 writes files; the others wait at a barrier.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when not started by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """True outside torchrun and on rank 0 under it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


@dataclass
class DistContext:
    """Rank and world size of this process in the default process group."""

    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sizes(self, n: int) -> list[int]:
        """Rows per rank when n rows are split into contiguous chunks (the first ranks get one more)."""
        return [n // self.world + (1 if r < n % self.world else 0) for r in range(self.world)]

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous chunk of n rows."""
        sizes = self.sizes(n)
        start = sum(sizes[:self.rank])
        return start, start + sizes[self.rank]

    def gather_rows(self, x: torch.Tensor, n: int, grad: bool = False) -> torch.Tensor:
        """The n global rows from every rank's chunk (this rank's chunk is ``x``); differentiable if ``grad``."""
        sizes = self.sizes(n)
        pad = max(sizes)
        if x.shape[0] < pad:
            x = torch.cat([x, x.new_zeros((pad - x.shape[0], *x.shape[1:]))])
        full = _GatherPadded.apply(x) if grad else _gather_padded(x.detach())
        return torch.cat([full[r * pad:r * pad + s] for r, s in enumerate(sizes)])

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a few floats over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def sum_grads(self, params: list[nn.Parameter]) -> None:
        """Sum the gradients over ranks (each rank's loss is its share of the global loss)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's value of ``x`` on every rank."""
        x = x.contiguous()
        dist.broadcast(x, 0)
        return x

    def broadcast_float(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        return float(self.broadcast(t).item())

    def barrier(self) -> None:
        dist.barrier()



def init_from_env(device: torch.device) -> DistContext | None:
    """Join (or create) the process group torchrun describes; None for a single-process run.

    A group this creates lives until the process exits, so later ``fit`` calls in the same process
    (a resume, another run) join it: re-creating a gloo group under torchrun's shared store is
    not reliable (ranks may read the previous group's addresses).
    """
    if env_world_size() <= 1 or not dist.is_available():
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy)
    if dist.get_world_size() <= 1:
        return None
    return DistContext(dist.get_rank(), dist.get_world_size())


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def _gather_padded(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherPadded(torch.autograd.Function):
    """All-gather of equal-sized chunks; backward sums the gradients over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = x.shape[0]
        return _gather_padded(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        r = dist.get_rank()
        return grad[r * ctx.rows:(r + 1) * ctx.rows]


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: d(sum_r L_r)/d(s_r)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def _sum_ranks(x: torch.Tensor) -> torch.Tensor:
    return _SumAcrossRanks.apply(x) if torch.is_grad_enabled() and x.requires_grad else _SumAcrossRanks.forward(
        None, x)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training mode, normalises with the statistics of the rows of all ranks.

    Mean and (biased) variance are two-pass sums all-reduced over ranks, with gradients flowing
    through the reductions, so forward and backward equal those of one BatchNorm over the global
    batch up to float summation order. Running statistics follow ``nn.BatchNorm2d`` (unbiased
    variance), so they stay identical on every rank. Eval mode is plain BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        count = _sum_ranks(torch.tensor([float(x.numel() // c)], dtype=x.dtype, device=x.device))
        mean = _sum_ranks(x.sum(dim=(0, 2, 3))) / count
        centred = x - mean.view(1, c, 1, 1)
        var = _sum_ranks((centred * centred).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                n = float(count)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1.0, 1.0)), alpha=m)
        out = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return out


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` under ``module`` by a :class:`GlobalBatchNorm2d` sharing its tensors."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


def share(loss: torch.Tensor, rows: int, total: int) -> torch.Tensor:
    """This rank's share of a mean over ``total`` rows, given the mean over its ``rows`` rows."""
    if rows == 0 or total == 0:  # keep the graph (zero gradients, not None) so every rank sums the same tensors
        return torch.nan_to_num(loss, nan=0.0) * 0.0
    return loss * (rows / total)


__all__ = ["DistContext", "GlobalBatchNorm2d", "convert_batchnorm", "env_world_size", "init_from_env",
           "is_main_process", "local_rank", "share"]
