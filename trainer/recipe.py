"""The training recipe: how a run is put together, once, for every caller.

The Train node, the benchmarks and any other driver call these functions in this order:

    spec = TrainingSpec(network=..., optimizer=..., objective=resolve_objective(...), ...)
    session = start_session(denoiser, targets, model_examples(denoiser, dataset_examples), spec)
    notes = train(session, until=500, on_step=callback)     # fp8, checkpointing, memory check
    weights, metadata = lora_file(session, "my_lora")         # the file describes *this* session

The model is reached through the engine's Denoiser protocol (`trainer.loop`). A denoiser may also
offer, and ComfyUI's adapter does:
    load()                                  put the model on its device, ready for autograd
    training_context(precision)             how the base weights are stored while training (fp8)
    check_memory(session) -> str            estimate the run's peak memory, refuse a run that can't fit
    recompute_context(precision)            gradient checkpointing while the steps run
    latent_in(raw_latent)                   a VAE latent -> the model's latent space
    profile                                 the model family (trainer.profiles), for the file's metadata
    note                                    a line about the family for the user's notes

Public API:
    TrainingSpec                                   (trainer.spec)
    resolve_objective(prediction, examples, timestep_sampling, flow_shift, **objective) -> (ObjectiveConfig, note | None)
    model_examples(denoiser, examples) -> list[Example]
    start_session(denoiser, targets, examples, spec, start_weights=None, data_parallel=None, control=None) -> Session
        data_parallel: this process's place among several (trainer.distributed); every process
        calls the recipe alike, and the file records the process count and the global batch
        control: the bleed set (the base model's own samples of control prompts)
    train(session, until, on_step=None) -> list[str]   notes for the user (memory estimate)
    lora_file(session, output_name) -> (weights, metadata)
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import Callable, Mapping

import torch

from .data import Example
from .distributed import DataParallel
from .errors import ConfigError, LoRALabError
from .io import build_metadata, check_compatible
from .loop import Session, StepInfo
from .network import LoRANetwork, Target
from .objective import ObjectiveConfig, flux_resolution_shift, validate_for_prediction
from .precision import check_device_support
from .profiles import Profile, profile_for
from .spec import TrainingSpec

# "flux_shift" is "shift" with Flux's resolution-dependent value, computed from the dataset.
FLUX_SHIFT = "flux_shift"
FLOW_SHIFT = 3.0  # the shift of timestep_sampling "shift" unless the user sets one (Flux-dev style)

# Wan 2.2 A14B is two experts, each its own model file (both load as ComfyUI's WAN21): the high-noise
# expert denoises timesteps t >= boundary, the low-noise one t < boundary (t = sigma in 0..1). The
# boundaries are Wan2.2's own configs (t2v_A14B 0.875, i2v_A14B 0.900), as musubi-tuner uses them.
EXPERTS = ("none", "high_noise", "low_noise")
EXPERT_BOUNDARY = 0.875


def expert_range(expert: str = "none", boundary: float = EXPERT_BOUNDARY) -> tuple[float, float]:
    """The share of the noise range a model trains on: all of it, or one expert's side of `boundary`."""
    if expert not in EXPERTS:
        raise ConfigError("expert", f"expected one of {', '.join(EXPERTS)}, got {expert!r}.")
    if not 0.0 < boundary < 1.0:
        raise ConfigError("expert_boundary", f"must be between 0 and 1 (Wan 2.2 A14B: 0.875 text-to-video, 0.9 image-to-video), got {boundary!r}.")
    return {"none": (0.0, 1.0), "high_noise": (boundary, 1.0), "low_noise": (0.0, boundary)}[expert]


def _image_tokens(examples: list[Example]) -> int:
    """Flux image tokens (2x2 latent patches) of the dataset's most common bucket."""
    counts: dict[int, int] = {}
    for ex in examples:
        h, w = ex.latents[0].shape[-2:]
        tokens = -(-h // 2) * -(-w // 2)
        counts[tokens] = counts.get(tokens, 0) + ex.repeats
    return max(counts, key=lambda t: (counts[t], t))


def resolve_objective(prediction: str, examples: list[Example], timestep_sampling: str = "uniform", flow_shift: float = FLOW_SHIFT,
                      expert: str = "none", expert_boundary: float = EXPERT_BOUNDARY, **objective) -> tuple[ObjectiveConfig, str | None]:
    """The objective for this model and dataset; 'flux_shift' becomes 'shift' at the value Flux
    uses for the dataset's resolution; an `expert` trains on its side of the boundary only.
    Settings that don't apply to the model are refused here, before anything is loaded, naming the input."""
    note, shift = None, flow_shift
    objective["timestep_range"] = expert_range(expert, expert_boundary)
    if timestep_sampling == FLUX_SHIFT:
        if prediction != "flow":
            raise ConfigError("timestep_sampling", "flux_shift is for flow models such as Flux; use uniform for SD1.5 and SDXL.")
        tokens = _image_tokens(examples)
        shift = flux_resolution_shift(tokens)
        timestep_sampling = "shift"
        note = f"flux_shift: shift {shift:.3f} for {tokens} image tokens."
    config = ObjectiveConfig(timestep_sampling=timestep_sampling, shift=shift, **objective)
    validate_for_prediction(config, prediction)
    return config, note


def model_examples(denoiser, examples: list[Example]) -> list[Example]:
    """Raw VAE latents -> the model's latent space, as fresh tensors autograd can use (ComfyUI
    hands out inference tensors)."""
    latent_in = getattr(denoiser, "latent_in", lambda t: t)
    out = []
    for ex in examples:
        latents = [latent_in(lat[None].clone().float())[0] for lat in ex.latents]
        out.append(replace(ex, latents=latents, conds=[_fresh(c) for c in ex.conds], extra=dict(ex.extra)))
    return out


def _profile(denoiser) -> Profile:
    """The denoiser's family profile; a plain-PyTorch denoiser counts as SD1.5 (eps, UNet names)."""
    return getattr(denoiser, "profile", None) or profile_for("sd15")


def _fresh(value):
    """A copy of a conditioning (dicts of tensors, nested) whose tensors autograd can use."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    return value


def start_session(denoiser, targets: list[Target], examples: list[Example], spec: TrainingSpec, start_weights: Mapping[str, torch.Tensor] | None = None, start_field: str = "start_from_lora",
                  data_parallel: DataParallel | None = None, control: list[Example] | None = None) -> Session:
    """A new session. The LoRA's initial weights follow the seed; `start_weights` (a saved LoRA of
    the same family, rank and targets) replaces them, refused naming `start_field` otherwise.
    `control` (the base model's samples of the control prompts, in the model's latent space) is
    the set concept bleed is measured on."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train.seed)
        network = LoRANetwork(targets, spec.network)
    if start_weights is not None:
        try:
            check_compatible(start_weights, set(network.loras), _profile(denoiser).label)
            network.load_kohya(dict(start_weights))
        except LoRALabError as e:
            raise ConfigError(start_field, str(e)) from None
    return Session(denoiser, examples, network, spec, data_parallel=data_parallel, control=control)


def train(session: Session, until: int, on_step: Callable[[StepInfo], None] | None = None) -> list[str]:
    """Trains `session` to step `until` (a finished session starts a new schedule cycle), inside
    the model's training context (fp8 base weights, gradient checkpointing), after the memory
    check. Returns notes for the user. Raises what the callback raises (Cancel), with the session
    intact at the last finished step."""
    denoiser = session.denoiser
    if hasattr(denoiser, "load"):
        denoiser.load()
    storage = denoiser.training_context(session.precision) if hasattr(denoiser, "training_context") else nullcontext()
    warning = check_device_support(session.precision, denoiser.device)
    notes = [n for n in (getattr(denoiser, "note", ""), warning) if n]
    with storage:
        if hasattr(denoiser, "check_memory"):
            notes.append(denoiser.check_memory(session))
        with denoiser.recompute_context(session.precision) if hasattr(denoiser, "recompute_context") else nullcontext():
            session.run(until_step=until, callback=on_step)
    return notes


def lora_file(session: Session, output_name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya-format weights (fp32) and the metadata of the LoRA `session` trained, read from the
    session's own spec: a chained Train node that continued it writes what really trained."""
    spec, net = session.spec, session.spec.network
    parallel = session.data_parallel
    weights = session.network.to_kohya(torch.float32)
    metadata = build_metadata(
        base_model=_profile(session.denoiser),
        output_name=output_name,
        network=net,
        learning_rate=spec.optimizer.unet_lr,
        text_encoder_lr=spec.optimizer.text_encoder_lr if net.train_text_encoder else None,
        steps=session.step,
        epochs=session.epoch_of(max(session.step - 1, 0)) + 1,
        started_at=session.started_at,
        optimizer=spec.optimizer.name,
        scheduler=spec.schedule.name,
        extra={
            "lora_lab_seed": str(spec.train.seed),
            "lora_lab_loss_type": spec.objective.loss_type,
            "lora_lab_prediction": session.denoiser.prediction,
            **({"lora_lab_processes": str(parallel.world_size), "lora_lab_global_batch": str(session.global_batch)} if parallel else {}),
        },
    )
    return weights, metadata
