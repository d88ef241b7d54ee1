"""The training loop: one `Session` per LoRA being trained, run in as many pieces as the user likes.

Read `Session._train_step` top to bottom: draw a batch, draw noise levels and noise, denoise
through the model with the LoRA applied, weigh the loss, step the optimizer, guard against NaN.

Everything random in a step is derived from (seed, step, micro-batch), never from a running
generator, so stopping after step k and resuming gives exactly the loss sequence of an
uninterrupted run, and two runs with the same seed are identical.

The model is reached through the `Denoiser` protocol (ComfyUI's adapter implements it; the tests use
a toy): it maps a uniform draw u to a noise level sigma, builds the noisy input, and returns the
model's denoised estimate x0_hat.

The learning-rate schedule runs in *cycles*: the first run of a session is one cycle of its
length; running a finished session further (the user queues again for `steps` more) adds a new
cycle over just those steps — a visible warm restart, warmup included — instead of stretching the
old curve (which would jump back up mid-decay) or staying at its floor (which for cosine is 0 and
would train nothing). A run that was interrupted finishes its own cycle first.

Public API:
    TrainConfig                 steps/epochs, batch, accumulation, seed, validation, NaN guard
    Denoiser                    protocol the model adapter implements
    StepInfo                    what callbacks receive after every optimizer step
    Session(denoiser, examples, network, spec=TrainingSpec(...), data_parallel=None, control=None)
        (or the parts as keywords: optimizer=..., schedule=..., precision=..., objective=..., train=...)
        data_parallel (trainer.distributed): one of several processes; the global batch is
        batch_size x processes, drawn here whole, trained on this process's slice
        examples marked `regularisation` train alongside at their loss_weight, never held out;
        `control` (Examples: the base model's own samples of control prompts) is the bleed set
        .run(until_step=None, callback=None) -> History   (callback may raise to interrupt)
        .step, .total_steps, .history, .diagnosis(), .spec, .started_at, .cycles
        .validation_loss(), .bleed_loss(), .base_loss(measure)  fixed-noise losses (at strength 0)
        .lr_at(step) / .lr_plan(until) -> [(step, lr)]  the schedule as it trains, cycles included
        .rebind(denoiser, targets)                      the same model, loaded again
        .state_dict() -> (tensors, meta)  /  .load_state_dict(tensors, meta)   resume, no pickle
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

import torch

from .data import Example, _mix, batches_per_epoch, collate, epoch_batches
from .distributed import DataParallel
from .errors import ConfigError, LoRALabError, TrainingError
from .diagnosis import Diagnosis, diagnose
from .monitor import History, fixed_validation_plan, split_validation
from .memory import HOW_TO_FIT, is_out_of_memory
from .network import LoRANetwork
from .objective import add_noise_offset, per_sample_loss, sample_u, validate_for_prediction
from .optimizers import build_optimizer
from .optim_step import all_finite, make_loss_scaler, optimizer_step
from .precision import autocast, for_device
from .schedule import lr_multiplier, preview
from .spec import TrainConfig, TrainingSpec  # noqa: F401  (TrainConfig is part of this module's API)


class Denoiser(Protocol):
    prediction: str  # "eps", "v" or "flow"
    device: torch.device

    def sigma_from_u(self, u: torch.Tensor) -> torch.Tensor: ...

    def noise_input(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, conds: list[Any]) -> torch.Tensor: ...


@dataclass(frozen=True)
class StepInfo:
    step: int  # optimizer steps done, after this one
    total_steps: int
    loss: float  # mean loss of this step (nan if skipped for a non-finite loss)
    lr: float  # unet group lr used for this step
    skipped: bool
    grad_norm: float
    seconds_per_step: float
    eta_seconds: float
    epoch: int


class Session:
    """One LoRA training: model adapter, data, network, optimizer and all the state to resume."""

    def __init__(self, denoiser: Denoiser, examples: list[Example], network: LoRANetwork, spec: TrainingSpec | None = None, data_parallel: DataParallel | None = None,
                 control: list[Example] | None = None, **parts):
        if spec is None:
            # The network's own config is the spec's: one source for rank/alpha/targets.
            spec = TrainingSpec(network=network.config, **parts)
        elif parts:
            raise TypeError("give either spec or its parts, not both")
        if not examples:
            raise ConfigError("dataset", "the dataset is empty: add images (with .txt captions) to the folder.")
        validate_for_prediction(spec.objective, denoiser.prediction)
        # "auto" precision becomes concrete for the device the session trains on.
        spec = replace(spec, precision=for_device(spec.precision, denoiser.device))
        self.spec = spec
        self.denoiser, self.network = denoiser, network
        self.data_parallel = data_parallel
        # Every process draws the whole global batch; batch_size is per process.
        self.global_batch = spec.train.batch_size * (data_parallel.world_size if data_parallel else 1)
        self.optimizer_config, self.schedule, self.precision = spec.optimizer, spec.schedule, spec.precision
        self.objective, self.train = spec.objective, spec.train
        train = spec.train
        self.started_at = time.time()  # wall-clock start, for the file's metadata
        self.memory_estimate = None  # the recipe's estimate of this run's peak memory, made once
        concept = [ex for ex in examples if not ex.regularisation]
        if not concept:
            raise ConfigError("dataset", "it holds regularisation images only: add the images of your concept to the folder.")
        train_idx, val_idx = (
            split_validation(len(concept), train.validation_split, train.seed)
            if train.validation_split > 0
            else (list(range(len(concept))), [])
        )
        # Regularisation images always train: held out, they would measure the class, not the concept.
        self.examples = [concept[i] for i in train_idx] + [ex for ex in examples if ex.regularisation]
        self.val_examples = [concept[i] for i in val_idx]
        self.val_plan = fixed_validation_plan(len(self.val_examples), train.seed, self._val_fractions()) if self.val_examples else []
        # The bleed set: measured like validation, with its own fixed noise.
        self.control = list(control or [])
        self.control_plan = fixed_validation_plan(len(self.control), _mix(train.seed, 0xB1EED), self._val_fractions()) if self.control else []
        images = sum(ex.repeats for ex in self.examples)
        if self.global_batch > images:
            several = data_parallel is not None and data_parallel.world_size > 1
            per = f" x {data_parallel.world_size} processes = {self.global_batch}" if several else ""
            fix = f"use batch_size x processes <= {images}" if several else f"use batch_size <= {images}"
            raise ConfigError(
                "batch_size",
                f"{train.batch_size}{per} is larger than the dataset ({images} images x repeats after the validation split); {fix} or add images.",
            )
        self.batches_per_epoch = batches_per_epoch(self.examples, self.global_batch)
        network.to(denoiser.device)
        self.params = [p for p in network.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(spec.optimizer, network.param_groups(), denoiser.device)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.scaler = make_loss_scaler(spec.precision)  # None unless fp16
        self.history = History()
        self.step = 0
        self.lr_scale = 1.0
        self.bad_streak = 0
        self.cycles: list[tuple[int, int]] = [(0, self.total_steps)]  # [start, end) of each schedule cycle
        self._snapshot = self._take_snapshot()
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def rebind(self, denoiser: Denoiser, targets) -> None:
        """Train on `denoiser` from now on: the same model, loaded again (the caller checked that
        its weights are the ones this session trained on)."""
        self.network.rebind(targets)
        self.denoiser = denoiser

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-self.batches_per_epoch // self.train.gradient_accumulation))

    @property
    def total_steps(self) -> int:
        return self.train.steps or self.train.epochs * self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return (step * self.train.gradient_accumulation) // self.batches_per_epoch

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self, until_step: int | None = None, callback: Callable[[StepInfo], None] | None = None) -> History:
        """Trains until `until_step` (default: the configured total). Resumable at any point.

        `callback` runs after every optimizer step, once the state is consistent, so a callback
        that raises (ComfyUI's Cancel) leaves a session that continues exactly where it stopped.
        """
        until = self.total_steps if until_step is None else until_step
        self._extend_cycles(until)
        total = max(until, self.cycles[-1][1])
        validate_every = self.train.validation_every or max(1, total // 10)
        started, started_step = time.perf_counter(), self.step
        if self.val_examples and self.history.base_val_loss is None:
            self.history.base_val_loss = self.base_validation_loss()
        if self.control and self.history.base_bleed_loss is None:
            self.history.base_bleed_loss = self.base_loss(self.bleed_loss)
        if self.val_examples and not self.history.val_step:
            self.history.record_validation(self.step, self.validation_loss())
        if self.control and not self.history.bleed_step:
            self.history.record_bleed(self.step, self.bleed_loss())
        while self.step < until:
            loss, result = self._step_or_out_of_memory()
            elapsed = time.perf_counter() - started
            per_step = elapsed / (self.step - started_step)
            if self.step % validate_every == 0 or self.step == until:
                if self.val_examples:
                    self.history.record_validation(self.step, self.validation_loss())
                if self.control:
                    self.history.record_bleed(self.step, self.bleed_loss())
            if callback:
                callback(
                    StepInfo(
                        step=self.step,
                        total_steps=total,
                        loss=loss,
                        lr=self.history.lr[-1] if self.history.lr else self._lr(self.step - 1)[0],
                        skipped=result.skipped,
                        grad_norm=result.grad_norm,
                        seconds_per_step=per_step,
                        eta_seconds=per_step * (until - self.step),
                        epoch=self.epoch_of(self.step - 1),
                    )
                )
        return self.history

    def _step_or_out_of_memory(self):
        """`_train_step`, with running out of memory turned into a TrainingError that says how to
        fit. Nothing of the failed step is kept (its gradients are dropped; weights, optimizer and
        step are as before it, like after a Cancel), so queueing again retries that step."""
        try:
            return self._train_step()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # Raised outside the except block: the failed step's frames and tensors are freed first.
        self.optimizer.zero_grad(set_to_none=True)
        raise TrainingError(
            f"out of memory in training step {self.step + 1} ({reason}). The {self.step} steps trained so far are kept: "
            f"queue again with the same settings to continue from step {self.step} once memory is free "
            f"(changing settings starts a new LoRA). To fit: {HOW_TO_FIT}"
        )

    # ---- the schedule, in cycles ------------------------------------------------------------------
    def _extend_cycles(self, until: int) -> None:
        """Training past the last cycle's end starts a new cycle there (see the module docstring)."""
        end = self.cycles[-1][1]
        if until > end:
            self.cycles.append((end, until))

    def _cycle_of(self, step: int) -> tuple[int, int]:
        for start, end in self.cycles:
            if step < end:
                return start, end
        return self.cycles[-1]

    def lr_at(self, step: int) -> float:
        """The unet lr of 0-based optimizer step `step` as the schedule gives it (before NaN backoff)."""
        start, end = self._cycle_of(step)
        return self.base_lrs[0] * lr_multiplier(self.schedule, min(step, end - 1) - start, end - start)

    def lr_plan(self, until: int | None = None, points: int = 200) -> list[tuple[int, float]]:
        """(0-based step, unet lr) for a chart of the schedule up to `until`: the cycles trained
        so far plus the one a run to `until` would add — exactly what `run(until)` follows."""
        cycles = list(self.cycles)
        if until is not None and until > cycles[-1][1]:
            cycles.append((cycles[-1][1], until))
        plan = []
        for start, end in cycles:
            plan += [(start + s, lr) for s, lr in preview(self.schedule, self.base_lrs[0], end - start, points)]
        return plan

    def _lr(self, step: int) -> list[float]:
        start, end = self._cycle_of(step)
        m = lr_multiplier(self.schedule, min(step, end - 1) - start, end - start) * self.lr_scale
        return [base * m for base in self.base_lrs]

    def _batch(self, micro: int) -> list[int]:
        epoch, pos = divmod(micro, self.batches_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, epoch_batches(self.examples, self.global_batch, self.train.seed, epoch))
        return self._epoch_cache[1][pos]

    def _forward_loss(self, examples: list[Example], indices: list[int], g: torch.Generator, u: torch.Tensor | None = None, seed: int = 0, part: slice = slice(None)) -> torch.Tensor:
        """Per-sample loss of one batch; all randomness comes from `g` (and `seed` for dropout).
        The randomness of the whole batch is drawn, then only `part` of it is trained (data
        parallel: this process's slice), so a slice sees what it would in one process."""
        device = self.denoiser.device
        picks = torch.randint(0, 1 << 30, (len(indices),), generator=g).tolist()
        x0, conds = collate(examples, indices, picks)
        if u is None:
            u = sample_u(self.objective, len(indices), g, "cpu")
        noise = torch.randn(x0.shape, generator=g)
        if self.objective.noise_offset > 0:
            noise = add_noise_offset(noise, self.objective.noise_offset, g)
        x0, conds, u, noise = x0[part].to(device, torch.float32), conds[part], u[part], noise[part]
        if not len(x0):
            return x0.new_zeros(0)
        sigma = self.denoiser.sigma_from_u(u.to(device))
        x = self.denoiser.noise_input(x0, noise.to(device), sigma)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # LoRA dropout draws from the global RNG
            torch.manual_seed(seed)
            with autocast(self.precision, device), self.network.applied():
                x0_hat = self.denoiser.denoise(x, sigma, conds)
        return per_sample_loss(x0_hat.float(), x0, sigma, self.denoiser.prediction, self.objective)

    def _train_step(self):
        accum, step = self.train.gradient_accumulation, self.step
        for group, lr in zip(self.optimizer.param_groups, self._lr(step)):
            group["lr"] = lr
        losses, finite, dp = [], True, self.data_parallel
        for k in range(accum):
            g = torch.Generator().manual_seed(_mix(self.train.seed, step, k))
            batch = self._batch(step * accum + k)
            seed = _mix(self.train.seed, step, k, 1)
            weights = torch.tensor([self.examples[i].loss_weight for i in batch], device=self.denoiser.device)
            if dp is None:
                loss = (self._forward_loss(self.examples, batch, g, seed=seed) * weights).mean()
                losses.append(loss.item())
            else:  # this slice's share of the global batch's mean; the sum over processes is the mean
                part = dp.part(batch)
                loss = (self._forward_loss(self.examples, batch, g, seed=seed, part=part) * weights[part]).sum() / len(batch)
                losses.append(dp.sum(loss).item())
            if not math.isfinite(losses[-1]):
                finite = False  # no backward: a NaN loss would only poison the gradients
                continue
            if loss.requires_grad:  # a process with an empty slice has nothing to backpropagate
                (self.scaler.scale(loss / accum) if self.scaler else loss / accum).backward()
        if finite and dp is not None:
            dp.sum_gradients(self.params)
        if finite:
            result = optimizer_step(self.optimizer, self.params, self.scaler, self.precision.max_grad_norm)
            # With a finite loss, an fp16 gradient overflow is the loss scaler doing its job (it
            # backs off and the step is skipped); only once the scale has collapsed is it a fault.
            bad = result.skipped and (self.scaler is None or self.scaler.current_scale < 1.0)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            result = _Skipped()
            bad = True
        if not bad and not all_finite(self.params):
            bad = True
        mean_loss = sum(losses) / len(losses) if finite else float("nan")
        self.step += 1
        self.history.record(self.step, mean_loss, self.optimizer.param_groups[0]["lr"], self.epoch_of(step))
        if bad:
            self._on_bad_step()
        else:
            self.bad_streak = 0
            if self.step % self.train.snapshot_every == 0:
                self._snapshot = self._take_snapshot()
        return mean_loss, result

    def _on_bad_step(self) -> None:
        """Roll back to the last good weights, lower the LR, and give up after too many in a row."""
        self.bad_streak += 1
        self._restore_snapshot(self._snapshot)
        self.lr_scale *= self.train.lr_backoff
        self.history.record_rollback(self.step, self._snapshot["step"], self.lr_scale)
        if self.bad_streak >= self.train.max_bad_steps:
            raise TrainingError(
                f"training stopped: {self.bad_streak} steps in a row gave a non-finite (NaN/inf) loss or gradient, "
                f"even after rolling back to step {self._snapshot['step']} and lowering the LR to "
                f"{self.lr_scale:g}x. Lower unet_lr (e.g. halve it), use bf16 or fp32 instead of fp16, "
                "and check the dataset for broken images. The last good weights are kept; nothing with NaN is saved."
            )

    # ---- validation --------------------------------------------------------------------------------
    def _val_fractions(self) -> tuple[float, ...]:
        """The fixed validation noise levels (0.2, 0.4, 0.6, 0.8), placed inside the trained
        timestep_range: a Wan 2.2 expert is measured where it denoises."""
        lo, hi = self.objective.timestep_range
        return tuple(lo + f * (hi - lo) for f in (0.2, 0.4, 0.6, 0.8))

    @torch.no_grad()
    def validation_loss(self, examples: list[Example] | None = None, plan=None) -> float:
        """Mean loss at fixed noise levels and fixed noise, so it is comparable across steps.

        Defaults to the held-out split; pass other examples (and a plan from
        `fixed_validation_plan`) to evaluate anything else the same way.
        """
        examples = self.val_examples if examples is None else examples
        plan = (self.val_plan if examples is self.val_examples else fixed_validation_plan(len(examples), self.train.seed, self._val_fractions())) if plan is None else plan
        was_training = self.network.training
        self.network.eval()  # no LoRA dropout while measuring
        try:
            losses = []
            for item, u, noise_seed in plan:
                g = torch.Generator().manual_seed(noise_seed)
                u_t = torch.tensor([u], dtype=torch.float32)
                losses.append(self._forward_loss(examples, [item], g, u=u_t, seed=noise_seed).item())
        finally:
            self.network.train(was_training)
        return sum(losses) / len(losses)

    def bleed_loss(self) -> float:
        """The fixed-noise loss on the control set: the base model's own samples of prompts the LoRA
        should leave alone. The base model predicts them well; a LoRA that raises it changes them."""
        return self.validation_loss(self.control, self.control_plan)

    def base_loss(self, measure: Callable[[], float]) -> float | None:
        """`measure()` on the model without the LoRA (strength 0); None when it is not finite."""
        strength, self.network.strength = self.network.strength, 0.0
        try:
            loss = measure()
        finally:
            self.network.strength = strength
        return loss if math.isfinite(loss) else None

    def base_validation_loss(self) -> float | None:
        """Validation loss of the model without the LoRA (strength 0): what the verdicts compare
        against. None when it is not finite (then the first validation is the reference)."""
        return self.base_loss(self.validation_loss)

    def diagnosis(self) -> Diagnosis:
        return diagnose(self.history, self.total_steps)

    # ---- state: snapshots for NaN rollback, and resume --------------------------------------------
    def _take_snapshot(self) -> dict:
        return {
            "step": self.step,
            "network": {k: v.detach().to("cpu", copy=True) for k, v in self.network.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
        }

    def _restore_snapshot(self, snap: dict) -> None:
        self.network.load_state_dict(snap["network"])
        self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Everything needed to resume, as safetensors-ready tensors + string metadata (no pickle).

        Randomness needs no saved generator state: every draw is derived from (seed, step)."""
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.network.state_dict().items():
            tensors[f"network/{k}"] = v.detach().to("cpu").contiguous()
        opt_tree = _flatten(self.optimizer.state_dict(), "optimizer", tensors)
        meta = {
            "step": self.step,
            "cycles": self.cycles,
            "started_at": self.started_at,
            "lr_scale": self.lr_scale,
            "bad_streak": self.bad_streak,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "history": self.history.to_dict(),
            "optimizer": opt_tree,
            "spec": self.spec.to_json(),
        }
        return tensors, {"lora_lab_state": json.dumps(meta)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Continues from `state_dict()`'s output. The state must come from a session with the
        same spec (the run's length aside); anything else is refused, naming what differs."""
        try:
            meta = json.loads(metadata["lora_lab_state"])
            saved = TrainingSpec.from_json(meta["spec"])
        except (KeyError, json.JSONDecodeError) as e:
            raise LoRALabError(f"this file is not a LoRA Lab training state ({e}); start a new training instead.") from e
        changed = [part for part, h in self.spec.parts().items() if saved.parts().get(part) != h]
        if changed:
            raise LoRALabError(
                f"the saved state was trained with other {', '.join(changed)} settings; "
                "set them as they were to continue, or start a new training."
            )
        net = {k[len("network/"):]: v for k, v in tensors.items() if k.startswith("network/")}
        self.network.load_state_dict(net)
        self.optimizer.load_state_dict(_unflatten(meta["optimizer"], tensors))
        self.step = int(meta["step"])
        self.cycles = [(int(a), int(b)) for a, b in meta["cycles"]]
        self.started_at = float(meta["started_at"])
        self.lr_scale = float(meta["lr_scale"])
        self.bad_streak = int(meta["bad_streak"])
        if self.scaler and meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        self.history = History.from_dict(meta["history"])
        self._snapshot = self._take_snapshot()


class _Skipped:
    skipped, grad_norm, scale = True, float("nan"), 1.0


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _flatten(obj, path: str, tensors: dict[str, torch.Tensor]):
    """A JSON tree where every tensor is replaced by {"__tensor__": key} into `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{path}/k{i}", tensors), _flatten(v, f"{path}/{i}", tensors)] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise LoRALabError(f"cannot save optimizer state value of type {type(obj).__name__} at {path}.")


def _unflatten(tree, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in tree["__dict__"]}
        if "__tuple__" in tree:
            return tuple(_unflatten(v, tensors) for v in tree["__tuple__"])
        if "__float__" in tree:
            return float(tree["__float__"])
    if isinstance(tree, list):
        return [_unflatten(v, tensors) for v in tree]
    return tree
