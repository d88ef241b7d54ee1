"""Data-parallel training: several processes train one LoRA, with the result of one process that
trains the whole global batch.

Every step, every process draws the *same* global batch (one bucket, `batch_size x processes`
images) and the same noise levels and noise for all of it from the one seed plan
(`trainer.loop`), then trains on its own contiguous slice (`DataParallel.part`). Each process's
loss is the sum over its slice divided by the global batch size, so the gradients summed across
processes (`sum_gradients`, one all-reduce per optimizer step) are the gradient of the global
batch's mean loss; every process then takes the same optimizer step on the same weights. The
per-step loss is summed the same way before the NaN guard looks at it, so a NaN anywhere skips,
rolls back and halves the LR on every process alike. Dropout in the LoRA draws its masks per
slice, so with dropout > 0 the runs agree in distribution, not bit for bit.

Why torch.distributed collectives, and not DistributedDataParallel: the LoRA is applied to the
shared ComfyUI model with forward hooks inside the engine's forward; there is no `nn.Module` whose
forward DDP could wrap. The LoRA parameters are tiny, so one flat all-reduce per step costs little.

Why the engine keeps its own autocast, fp16 loss scaling, gradient accumulation and device
placement instead of Accelerate's (weighed for the single-process path too):
  - autocast: ours *is* `torch.autocast` (trainer.precision), what Accelerate calls as well;
  - device placement: ComfyUI's model management decides where the model lives (it loads,
    offloads and casts weights, lowvram included); `Accelerator.prepare` would move the model
    behind its back. The LoRA follows the model's device (`Session`);
  - gradient accumulation: Accelerate's `accumulate()` exists to skip DDP's gradient sync on
    inner micro-batches; without DDP there is nothing to skip, and the loop's accumulation draws
    each micro-batch from the seed plan, which is what makes runs resumable bit for bit;
  - fp16 loss scaling: `GradScaler` binds to optimizer objects and needs CUDA for parts of it;
    the NaN guard needs to see a skipped step and roll back weights *and* optimizer state
    (trainer.optim_step, trainer.loop), which ours reports directly.
So Accelerate is not needed by the engine: `accelerate launch` (with the user's Accelerate config,
several machines included) starts the processes and sets the environment torch.distributed reads
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and `join()` joins that group.

Public API:
    DataParallel(rank=0, world_size=1, local_rank=0, keep_slices=False)   one process's place
        .part(indices) -> slice        this process's share of a global batch (recorded when keep_slices)
        .sum(tensor) -> tensor         the sum over all processes (a copy; the input is unchanged)
        .sum_gradients(params)         the .grad of `params` summed over all processes, in place
        .barrier()
        .is_main, .is_local_main, .slices
    launched() -> bool                 started by torchrun / accelerate launch (WORLD_SIZE > 1)
    join(device, timeout_s) -> DataParallel   joins the launcher's process group (gloo, nccl on CUDA)
    leave()
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ConfigError


class DataParallel:
    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, keep_slices: bool = False):
        if world_size < 1:
            raise ConfigError("processes", f"must be >= 1, got {world_size}.")
        if not 0 <= rank < world_size:
            raise ConfigError("rank", f"must be between 0 and {world_size - 1}, got {rank}.")
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.slices: list[tuple[list[int], int, int]] | None = [] if keep_slices else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def part(self, indices: list[int]) -> slice:
        """The contiguous slice of a global batch this process trains. Slices of all processes are
        disjoint and cover the batch; a ragged last batch gives some processes fewer (or none)."""
        n = len(indices)
        start, stop = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        if self.slices is not None:
            self.slices.append((list(indices), start, stop))
        return slice(start, stop)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """One all-reduce of every gradient (and of which parameters have one: a parameter no
        process gave a gradient keeps none, so the optimizer skips it as in one process)."""
        if self.world_size == 1 or not params:
            return
        device = params[0].device
        has = torch.tensor([float(p.grad is not None) for p in params], device=device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params] + [has])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, present in zip(params, flat[-len(params):].tolist()):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone() if present else None
            offset += n

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device, timeout_s: float = 600.0, keep_slices: bool = False) -> DataParallel:
    """Joins the process group the launcher set up in the environment. A collective that waits
    longer than `timeout_s` for a process fails instead of hanging."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DataParallel(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), keep_slices)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
