"""How much memory a training run needs, worked out before it starts, and what to do if it won't fit.

Peak = base weights + LoRA (fp32 weights and gradients) + optimizer state + activations kept for
backward + a transient workspace. Weights and LoRA/optimizer sizes are exact byte counts. The
activations are measured, not guessed: `probe_activations` runs one forward of one sample at the
dataset's largest bucket (a training batch of it) with the LoRA applied and records every tensor autograd saves for backward,
without keeping any of them (the probe itself needs no more memory than a plain forward). Each saved
tensor is attributed to the top-level block it was saved in, so the same probe tells what gradient
checkpointing keeps (each block's inputs, plus one block's activations while it is recomputed).

Public API:
    ActivationProfile        byte counts from the probe; .kept(checkpointing)
    probe_activations(forward, blocks, exclude=(), batch=1) -> ActivationProfile
    optimizer_state_bytes(name, param_numels) -> int
    estimate_peak_bytes(weight_bytes, lora_numels, optimizer, activations, batch_size,
                        gradient_checkpointing, snapshot_on_device=False, dataset_bytes=0,
                        extra=None) -> MemoryEstimate
    MemoryEstimate           .total, .parts (name -> bytes), .to_text(), .check_fits(free, resident)
    HOW_TO_FIT               the ways to make a run fit, in the user's words
    is_out_of_memory(exc) -> bool
    gib(bytes) -> str

Calibration (CPU, fp32, the tiny SDXL / Flux / SD1.5 test models, 64-512 px, batch 1-4, with and
without checkpointing, peak RSS with glibc's heap kept from hoarding freed blocks): the transient
workspace is about 2.5x the largest activation tensor of a batch with checkpointing (a block's
recomputation and its gradients), 0.5x without, plus ~8 MiB of bookkeeping. The estimate came
within -10%/+15% of the measured peak in those runs (it counts the rollback copy of the optimizer
state, which the engine takes every 20 steps). See bench/gpu_families.py (`calibrate`) and the tests.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .errors import ConfigError

# Bytes of optimizer state per trainable parameter (fp32 state unless 8-bit).
_STATE_BYTES = {"AdamW": 8, "AdamW8bit": 2, "Lion": 4, "Lion8bit": 1, "SGD": 4, "Prodigy": 16}
_FULL_STATE = {"AdamW8bit": 8, "Lion8bit": 4}  # bitsandbytes keeps 32-bit state for small tensors
_BNB_MIN_8BIT = 4096  # elements: smaller tensors stay 32-bit in bitsandbytes
_BNB_BLOCK = 2048  # one fp32 absmax per block of 8-bit state
# Transient memory beyond the saved activations, in units of the largest saved tensor: with
# checkpointing a block's recomputation and its gradients are alive together; without it the peak
# sits at the end of the forward, when little else is alive.
WORKSPACE_FACTOR = {True: 2.5, False: 0.5}
RUNTIME_BYTES = 8 * 2**20  # allocator and framework bookkeeping that grows with a training step


HOW_TO_FIT = (
    "turn on gradient_checkpointing and fp8_base (Precision node), lower batch_size, use AdamW8bit, "
    "a smaller rank, or a lower dataset resolution; close other programs using the device."
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device or host allocation failure (CUDA/ROCm, MPS, or the CPU allocator)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc) if isinstance(exc, RuntimeError) else ""
    return "out of memory" in text or "can't allocate memory" in text


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class ActivationProfile:
    """What one sample's forward saves for backward, in bytes."""

    saved: int  # everything, without checkpointing
    outside_blocks: int  # saved outside the checkpointable blocks (embeddings, final layer)
    block_inputs: int  # the inputs of every block: what checkpointing keeps instead
    largest_block: int  # the most one block saves: held while it is recomputed in backward
    largest_tensor: int  # the largest single saved tensor (scale of the backward workspace)
    batch: int = 1  # samples in the probed forward

    def kept(self, checkpointing: bool) -> int:
        """Bytes kept for backward by the probed batch."""
        if not checkpointing:
            return self.saved
        return self.outside_blocks + self.block_inputs + self.largest_block


@contextmanager
def _saved_tensor_counter(record: Callable[[torch.Tensor], None]) -> Iterator[None]:
    def pack(t: torch.Tensor):
        record(t)
        return None  # nothing is kept: the probe never runs backward

    def unpack(_):
        raise RuntimeError("memory probe: backward through a probed forward is not possible")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        s = t.untyped_storage()
        return (t.device.type, s.data_ptr(), s.nbytes())
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some wrappers)
        return (t.device.type, id(t), t.numel() * t.element_size())


def probe_activations(forward: Callable[[], object], blocks: Iterable[nn.Module], exclude: Iterable[torch.Tensor] = (), batch: int = 1) -> ActivationProfile:
    """Runs `forward()` (grad enabled, LoRA applied, `batch` samples: the training batch size is
    best, as some saved tensors are shared by the whole batch) and measures what backward would keep.

    blocks: the model's checkpointable top-level blocks, in any order.
    exclude: tensors never to count (the model's own weights, which autograd saves by reference).
    Tensors sharing storage are counted once; the input tensor of each block is recorded by a
    forward pre-hook.
    """
    excluded = {_storage_key(t) for t in exclude}
    live: dict[tuple, int] = {}  # storage -> saved tensors alive on it (the probe keeps none itself)
    current: list[int | None] = [None]
    per_block: dict[int, int] = {}
    totals = {"outside": 0, "inputs": 0, "largest_tensor": 0}

    def release(key: tuple) -> None:
        live[key] -= 1
        if not live[key]:
            del live[key]  # its memory may now be reused: a later tensor there is new

    def record(t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key in excluded:
            return
        known = key in live
        live[key] = live.get(key, 0) + 1
        weakref.finalize(t, release, key)
        if known:  # another view of a storage already counted
            return
        n = key[2]
        totals["largest_tensor"] = max(totals["largest_tensor"], n)
        if current[0] is None:
            totals["outside"] += n
        else:
            per_block[current[0]] = per_block.get(current[0], 0) + n

    handles = []
    for i, block in enumerate(blocks):

        def pre(module, args, kwargs, _i=i):
            current[0] = _i
            inputs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
            totals["inputs"] += sum(a.numel() * a.element_size() for a in inputs)

        def post(module, args, output):
            current[0] = None

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, always_call=True))
    try:
        with torch.enable_grad(), _saved_tensor_counter(record):
            forward()
    finally:
        for h in handles:
            h.remove()
    saved = totals["outside"] + sum(per_block.values())
    return ActivationProfile(
        saved=saved,
        outside_blocks=totals["outside"],
        block_inputs=totals["inputs"],
        largest_block=max(per_block.values(), default=0),
        largest_tensor=totals["largest_tensor"],
        batch=batch,
    )


def optimizer_state_bytes(name: str, param_numels: Iterable[int]) -> int:
    if name not in _STATE_BYTES:
        raise ConfigError("optimizer", f"unknown optimizer {name!r}; choose one of {', '.join(_STATE_BYTES)}.")
    total = 0
    for n in param_numels:
        if name in _FULL_STATE and n < _BNB_MIN_8BIT:
            total += _FULL_STATE[name] * n
        elif name in _FULL_STATE:
            states = 2 if name == "AdamW8bit" else 1
            total += _STATE_BYTES[name] * n + states * 4 * -(-n // _BNB_BLOCK)
        else:
            total += _STATE_BYTES[name] * n
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    total: int
    parts: dict = field(default_factory=dict)

    def to_text(self) -> str:
        shown = ", ".join(f"{k} {gib(v)}" for k, v in self.parts.items() if v)
        return f"estimated peak memory {gib(self.total)} ({shown})"

    def check_fits(self, free_bytes: int, resident_bytes: int = 0, device: str = "the device") -> None:
        """Raises ConfigError when what still has to be allocated exceeds `free_bytes`.

        resident_bytes: the part of the estimate already in memory (the loaded base weights).
        """
        needed = self.total - resident_bytes
        if needed <= free_bytes:
            return
        raise ConfigError(
            "batch_size",
            f"training needs about {gib(needed)} more memory on {device}, {gib(free_bytes)} is free "
            f"({self.to_text()}). To fit: {HOW_TO_FIT}",
        )


def estimate_peak_bytes(
    weight_bytes: int,
    lora_numels: Iterable[int],
    optimizer: str,
    activations: ActivationProfile,
    batch_size: int,
    gradient_checkpointing: bool,
    snapshot_on_device: bool = False,
    dataset_bytes: int = 0,
    extra: dict | None = None,
) -> MemoryEstimate:
    """Peak memory of a training step.

    weight_bytes: the base model's weights as they sit on the device (fp8 weights at 1 byte each).
    lora_numels: element counts of the trainable tensors (fp32 weights + fp32 gradients).
    activations: from `probe_activations` at the largest bucket; scaled from its batch to batch_size.
    snapshot_on_device: the engine keeps a copy of the LoRA and optimizer state for NaN rollback
        in host memory; on a CPU device that is the same memory.
    dataset_bytes: the cached latents and text-encoder outputs, when they share the device's
        memory (training on CPU); on a GPU they stay in host memory and only a batch moves over.
    extra: other named parts that share the device's memory.
    """
    numels = list(lora_numels)
    lora = 8 * sum(numels)  # fp32 weights + gradients
    state = optimizer_state_bytes(optimizer, numels)
    scale = batch_size / activations.batch
    acts = int(scale * activations.kept(gradient_checkpointing))
    workspace = int(WORKSPACE_FACTOR[bool(gradient_checkpointing)] * scale * activations.largest_tensor)
    parts = {"weights": int(weight_bytes), "lora+grads": lora, "optimizer": state, "activations": acts, "workspace": workspace + RUNTIME_BYTES}
    if snapshot_on_device:
        parts["rollback copy"] = 4 * sum(numels) + state
    if dataset_bytes:
        parts["dataset"] = int(dataset_bytes)
    for name, n in (extra or {}).items():
        parts[name] = int(n)
    return MemoryEstimate(sum(parts.values()), parts)
