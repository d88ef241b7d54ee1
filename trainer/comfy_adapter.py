"""The one module of the engine that imports ComfyUI: a ComfyUI MODEL as the engine's Denoiser.

What it translates:
    - the modules to adapt, with the kohya names every loader reads (`unet_targets`,
      `text_encoder_targets` for the CLIP when the text encoder trains): names come
      from ComfyUI's own LoRA key map (comfy.lora.model_lora_keys_unet), so ComfyUI's stock
      LoraLoader applies every key we write. SD1.5 uses the diffusers-path names sd-scripts writes
      (also read by diffusers and A1111); other families use the LDM / BFL paths sd-scripts writes.
    - the model's noise schedule and prediction type (`model_sampling`), so each family is
      trained with its own objective;
    - a training forward (`ComfyDenoiser.denoise`): BaseModel.apply_model, which returns the
      denoised estimate, with the conditioning built by the model's own `extra_conds`; with a
      `ComfyTextEncoder` the captions are encoded by the CLIP inside every step (text-encoder LoRA).

The LoRA is never merged into the model: the network's forward hooks are active only inside the
engine's forward, so the MODEL the user passed in samples exactly as before training. For the
MODEL output of the Train node, `apply_lora` patches a *clone*, like ComfyUI's LoraLoader.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import torch

import comfy.conds
import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.sd
import comfy.utils

from .errors import ConfigError
from .network import NetworkConfig, Target, find_targets, is_text_encoder
from .profiles import Profile, describe, detect

log = logging.getLogger("lora_lab")

def prediction_type(model) -> str:
    ms = model.model_sampling
    if isinstance(ms, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(ms, comfy.model_sampling.V_PREDICTION):
        return "v"
    if isinstance(ms, comfy.model_sampling.EPS):
        return "eps"
    raise ConfigError("model", f"unsupported prediction type {type(ms).__name__}: LoRA Lab trains eps, v and flow models.")


def kohya_unet_names(model, profile: Profile) -> dict[str, str]:
    """Module path inside diffusion_model -> kohya name, taken from ComfyUI's own LoRA key map."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    names: dict[str, str] = {}
    if profile.diffusers_names:
        # sd-scripts writes SD1.x / SD2.x UNet names on diffusers paths (read by ComfyUI, A1111 and diffusers).
        for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(model.model_config.unet_config).items():
            if diffusers_key.endswith(".weight"):
                names[ldm_key[: -len(".weight")]] = "lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")
    for kohya, sd_key in key_map.items():
        if isinstance(sd_key, str) and kohya.startswith("lora_unet_") and sd_key.endswith(".weight"):
            path = sd_key[len("diffusion_model.") : -len(".weight")]
            names.setdefault(path, kohya)
    return names


def unet_targets(model, config: NetworkConfig, profile: Profile | None = None) -> list[Target]:
    """The diffusion model's layers the family's reference trainer adapts, with its key names."""
    profile = profile or detect(model)
    names = kohya_unet_names(model, profile)
    prefix = "lora_unet_"

    def rename(path: str) -> str | None:
        return names[path][len(prefix) :] if path in names else None

    return find_targets(model.diffusion_model, prefix[:-1], profile.containers, profile.conv_containers, config, rename=rename)


TE_ATTENTION = "_self_attn_"


def text_encoder_targets(clip, profile: Profile, config: NetworkConfig) -> list[Target]:
    """The CLIP layers sd-scripts adapts (attention q/k/v/out and MLP fc1/fc2 of every encoder
    layer), with their kohya names, taken from ComfyUI's own CLIP LoRA key map so that stock
    LoraLoader applies every key. `attn_only` keeps the attention projections only. The profile
    names the CLIP parts that train (SD1.5 one CLIP-L "lora_te_"; SDXL "lora_te1_"/"lora_te2_";
    Flux CLIP-L only, never T5); ComfyUI's key map lists several aliases per module, these pick one."""
    if not profile.text_encoders:
        raise ConfigError("train_text_encoder", f"training the text encoder is not available for {profile.label} models; turn train_text_encoder off in the Network node.")
    root = getattr(clip, "cond_stage_model", None)
    if not isinstance(root, torch.nn.Module):
        raise ConfigError("clip", "this CLIP is not a ComfyUI text encoder LoRA Lab can train; connect the CLIP from your checkpoint loader.")
    targets = []
    for name, key in sorted(comfy.lora.model_lora_keys_clip(root, {}).items()):
        if not name.startswith(profile.text_encoders) or "_encoder_layers_" not in name or not key.endswith(".weight"):
            continue
        if config.targets == "attn_only" and TE_ATTENTION not in name:
            continue
        module = root.get_submodule(key[: -len(".weight")])
        if isinstance(module, torch.nn.Linear):
            targets.append(Target(name, module, "linear"))
    if not targets:
        raise ConfigError(
            "clip",
            f"no text-encoder layers to train were found in this CLIP for a {profile.label} model; connect the CLIP of the "
            "checkpoint you train on, or turn train_text_encoder off in the Network node.",
        )
    return targets


class ComfyTextEncoder:
    """Encodes captions with a ComfyUI CLIP while its LoRA trains: the same call the Dataset node
    cached its conditioning with, run again each step so gradients reach the text-encoder LoRA."""

    def __init__(self, clip):
        self.clip = clip
        self._tokens: dict[str, Any] = {}

    def load(self) -> None:
        self.clip.load_model()
        make_trainable(self.clip.cond_stage_model)

    def encode(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (cross_attn [tokens, dim], pooled [dim] or None) for one caption."""
        tokens = self._tokens.get(caption)
        if tokens is None:
            tokens = self._tokens[caption] = self.clip.tokenize(caption)
        guard = autograd_safe(self.clip.cond_stage_model, CLIP_CONTAINERS) if torch.is_grad_enabled() else nullcontext()
        with guard:
            out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        pooled = out.get("pooled_output")
        return out["cond"][0], pooled[0] if pooled is not None else None


def checkpoint_blocks(diffusion_model: torch.nn.Module, profile: Profile) -> list[torch.nn.Module]:
    """The blocks gradient checkpointing recomputes, in forward order (the profile's block lists:
    Flux's double/single blocks, a DiT's transformer blocks); for UNets the layers of each
    input/middle/output block (ResBlock, SpatialTransformer, ...), because ComfyUI's UNet runs
    those layers one by one and never calls the containing block."""
    out = []
    for attr in profile.checkpoint_blocks:
        try:
            blocks = diffusion_model.get_submodule(attr)
        except AttributeError:
            continue
        for block in blocks if isinstance(blocks, torch.nn.ModuleList) else [blocks]:
            if type(block).__name__ == "TimestepEmbedSequential":
                out.extend(block.children())
            else:
                out.append(block)
    return out


def make_trainable(module: torch.nn.Module) -> None:
    """Frozen, and no inference tensors left (ComfyUI loads weights under inference_mode).

    Autograd cannot save inference tensors for backward; on CPU nothing ever moves the weights
    out of that state. The clone has the same values, so every other user of the shared module
    computes exactly what it did before.
    """
    module.requires_grad_(False)
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()


def _clone_tensors(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _clone_tensor_kwargs(kwargs: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


# Text-encoder blocks that update activations in place (`x += self_attn(...)`), see autograd_safe.
CLIP_CONTAINERS = ("CLIPLayer",)


@contextmanager
def autograd_safe(diffusion_model: torch.nn.Module, containers: tuple[str, ...]) -> Iterator[None]:
    """Makes blocks that update activations in place trainable, for the duration of the block.

    ComfyUI's Flux blocks write `x += ...` / `txt += ...` into tensors their LayerNorms have
    saved for backward; with a LoRA upstream those tensors require grad and backward fails with
    "modified by an inplace operation". A pre-hook hands each such LayerNorm a copy of its input
    (the copy is what gets saved), so the in-place update no longer touches a saved tensor. The
    values computed are unchanged. The profile names such blocks (`inplace_blocks`; the generic
    path assumes every repeated block might); UNet models need nothing and get no hooks. ComfyUI's
    CLIP layers do the same (`containers=CLIP_CONTAINERS`) when the text-encoder LoRA trains.
    """
    handles = []
    for block in diffusion_model.modules():
        if type(block).__name__ not in containers:
            continue
        for sub in block.modules():
            if isinstance(sub, torch.nn.LayerNorm) or type(sub).__name__.endswith("Norm"):
                handles.append(sub.register_forward_pre_hook(lambda m, args: _clone_tensors(args)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _hooks_of(block: torch.nn.Module) -> list:
    """The forward hooks installed in `block` right now (the LoRA's, fp8's, autograd_safe's)."""
    out = []
    for m in block.modules():
        dicts = [getattr(m, d, None) for d in _HOOK_DICTS]
        if any(dicts):
            out.append((m, [type(d)(d) if d is not None else None for d in dicts]))
    return out


@contextmanager
def _hooks_restored(snapshot: list) -> Iterator[None]:
    saved = []
    for m, dicts in snapshot:
        saved.append((m, [getattr(m, d, None) for d in _HOOK_DICTS]))
        for name, d in zip(_HOOK_DICTS, dicts):
            if d is not None:
                setattr(m, name, d)
    try:
        yield
    finally:
        for m, dicts in saved:
            for name, d in zip(_HOOK_DICTS, dicts):
                if d is not None:
                    setattr(m, name, d)


@contextmanager
def gradient_checkpointing(diffusion_model: torch.nn.Module, profile: Profile) -> Iterator[None]:
    """Recompute each top-level block in backward instead of keeping its activations.

    Installed on the instances for the duration of training only, then removed.

    The LoRA is applied by forward hooks that exist only during the engine's forward call, but
    the recomputation runs later, inside backward: each block therefore recomputes with the hooks
    it had during its forward (otherwise it would compute without the LoRA, and torch stops with
    "a different number of tensors was saved"). A Flux block (the profile's `inplace_blocks`) updates its input tensor in place,
    which would hand the recomputation the block's *output* instead of its input (silently wrong
    gradients): inside the checkpoint, such blocks work on a copy of their inputs.
    """
    from torch.utils.checkpoint import checkpoint

    patched = []
    for block in checkpoint_blocks(diffusion_model, profile):
        original = block.forward
        if type(block).__name__ in profile.inplace_blocks:

            def run(*args, _f=original, **kwargs):
                return _f(*_clone_tensors(args), **_clone_tensor_kwargs(kwargs))

        else:
            run = original

        def forward(*args, _run=run, _block=block, **kwargs):
            if not torch.is_grad_enabled():
                return _run(*args, **kwargs)
            hooks, calls = _hooks_of(_block), []

            def once_then_with_hooks(*a, **kw):
                if not calls:  # the forward itself: the hooks are in place
                    calls.append(1)
                    return _run(*a, **kw)
                with _hooks_restored(hooks):  # the recomputation, during backward
                    return _run(*a, **kw)

            return checkpoint(once_then_with_hooks, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        patched.append(block)
    try:
        yield
    finally:
        for block in patched:
            del block.forward  # back to the class's forward


@contextmanager
def dataset_fits(label: str) -> Iterator[None]:
    """Turns the shape errors of a model run on conditioning or latents made for another model
    (a dataset encoded with another checkpoint's CLIP or VAE) into an error naming the dataset."""
    try:
        yield
    except RuntimeError as e:
        if "shapes cannot be multiplied" in str(e) or "size of tensor a" in str(e):
            raise ConfigError("dataset", f"its encoded images or captions don't fit this {label} MODEL ({e}). Encode the dataset with the VAE and text encoder "
                              "of the model you train (from the same checkpoint, or the loaders for this model's files).") from None
        raise


class ComfyDenoiser:
    """The engine's Denoiser protocol over a ComfyUI ModelPatcher."""

    def __init__(self, patcher, guidance: float = 1.0, text_encoder: ComfyTextEncoder | None = None):
        self.patcher = patcher
        self.text_encoder = text_encoder  # set when the text-encoder LoRA trains: captions are encoded each step
        self.model = patcher.model
        self.profile = detect(self.model)
        self.prediction = prediction_type(self.model)
        self.model_sampling = self.model.model_sampling
        self.device = comfy.model_management.get_torch_device()
        self.guidance = guidance
        self.note = ""  # what the user should know about the family (set by training_targets)

    def load(self) -> None:
        """Puts the model on the training device and makes its weights usable by autograd."""
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        make_trainable(self.model.diffusion_model)
        if self.text_encoder is not None:
            self.text_encoder.load()

    def sigma_from_u(self, u: torch.Tensor) -> torch.Tensor:
        if self.prediction == "flow":
            return u.float()
        sigmas = self.model_sampling.sigmas.to(u.device)
        # SD-style training draws one of the model's 1000 discrete timesteps, uniformly in u.
        idx = (u * len(sigmas)).long().clamp(0, len(sigmas) - 1)
        return sigmas[idx].float()

    def noise_input(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.model_sampling.noise_scaling(sigma, noise.clone(), x0)

    def latent_in(self, raw_latent: torch.Tensor) -> torch.Tensor:
        """VAE latent (what VAEEncode gives) -> the model's latent space (scale/shift)."""
        return self.model.process_latent_in(raw_latent)

    def model_conds(self, conds: list[dict], x: torch.Tensor) -> dict[str, Any]:
        """Batch of per-image conditioning -> apply_model kwargs, via the model's own extra_conds."""
        per_item = []
        for i, c in enumerate(conds):
            cross_attn, pooled = c["cross_attn"], c.get("pooled_output")
            if self.text_encoder is not None:
                cross_attn, pooled = self.text_encoder.encode(c["caption"])
            kw = dict(c.get("extra", {}))
            kw.update(
                cross_attn=cross_attn[None].to(x.device),
                device=x.device,
                noise=x[i : i + 1],
            )
            if self.profile.guidance:  # others use their own default (Chroma: 0), as when sampling
                kw["guidance"] = self.guidance
            # Present even when None, as in a sampled conditioning (T5-only models: Chroma's adm reads it).
            kw["pooled_output"] = pooled[None].to(x.device) if pooled is not None else None
            kw.setdefault("width", x.shape[-1] * 8)
            kw.setdefault("height", x.shape[-2] * 8)
            per_item.append(self.model.extra_conds(**kw))
        out = {}
        for name, first in per_item[0].items():
            if isinstance(first, comfy.conds.CONDConstant):
                out[name] = first.cond
                continue
            batched = first.concat([p[name] for p in per_item[1:]]) if len(per_item) > 1 else first.cond
            out[name] = batched.to(x.device) if hasattr(batched, "to") else batched
        return out

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, conds: list[dict]) -> torch.Tensor:
        kwargs = self.model_conds(conds, x)
        guard = autograd_safe(self.model.diffusion_model, self.profile.inplace_blocks) if torch.is_grad_enabled() else nullcontext()
        with dataset_fits(self.profile.label), guard:
            return self.model.apply_model(x, sigma, **kwargs)

    def training_context(self, precision):
        """fp8 base weights, for the duration of training only (the memory estimate runs inside)."""
        return fp8_base(self.model.diffusion_model, precision.fp8_base)

    def recompute_context(self, precision):
        """Gradient checkpointing while the steps run (entered after the memory estimate's probe)."""
        return gradient_checkpointing(self.model.diffusion_model, self.profile) if precision.gradient_checkpointing else nullcontext()

    def check_memory(self, session) -> str:
        """Estimates the run's peak memory (once per session), logs it, and stops with the ways to
        fit when it exceeds what is free on the device. Returns the line for the user's notes."""
        if session.memory_estimate is None:
            session.memory_estimate = estimate_memory(self, session.network, session.examples, session.optimizer_config.name, session.train.batch_size, session.precision)
        estimate = session.memory_estimate
        text = estimate.to_text()
        log.info("LoRA Lab: %s", text)
        # Already in memory: the loaded weights (and, training on CPU, the encoded dataset and fp8's copies).
        resident = resident_bytes(self.model.diffusion_model) + estimate.parts.get("dataset", 0) + estimate.parts.get("fp8 originals", 0)
        estimate.check_fits(free_memory_bytes(self.device), resident, str(self.device))
        return text[0].upper() + text[1:] + "."

    def same_model(self, model, clip=None) -> bool:
        """Whether this denoiser trains on exactly these ComfyUI objects (not a reload of them)."""
        te = self.text_encoder
        return self.model is model.model and (te is None or te.clip.cond_stage_model is clip.cond_stage_model)


def training_targets(model, network: NetworkConfig, guidance: float = 1.0, clip=None) -> tuple[ComfyDenoiser, list[Target]]:
    """The denoiser over a clone of MODEL and the layers to adapt (the CLIP's too when the text
    encoder trains)."""
    if network.train_text_encoder and clip is None:
        raise ConfigError("clip", "the Network trains the text encoder (train_text_encoder is on): connect the CLIP from your checkpoint loader to the Train node's clip input, or turn train_text_encoder off.")
    text_encoder = ComfyTextEncoder(clip) if network.train_text_encoder else None
    denoiser = ComfyDenoiser(model.clone(), guidance=guidance, text_encoder=text_encoder)
    targets = unet_targets(denoiser.model, network, denoiser.profile)
    denoiser.note = describe(denoiser.profile, len(targets))
    if text_encoder is not None:
        targets += text_encoder_targets(clip, denoiser.profile, network)
    if denoiser.profile.generic:
        log.warning("LoRA Lab: %s", denoiser.note)
    return denoiser, targets


@contextmanager
def fp8_base(diffusion_model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Base Linear/Conv weights stored as fp8 for the duration of the block (PrecisionConfig.fp8_base).

    The MODEL is shared with the rest of the workflow, so an exact copy of each weight waits in
    host memory and is put back afterwards: sampling with the original MODEL is unchanged. Weights
    ComfyUI already stores in fp8 (UNETLoader weight_dtype fp8_*) are left as they are.
    """
    if not enabled:
        yield
        return
    from .fp8 import store_base_fp8

    handle = store_base_fp8(diffusion_model.modules(), keep_original=True)
    try:
        yield
    finally:
        handle.restore()


def resident_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters()) + sum(t.numel() * t.element_size() for t in module.buffers())


def estimate_memory(denoiser: "ComfyDenoiser", network, examples, optimizer: str, batch_size: int, precision) -> "MemoryEstimate":
    """Peak memory of training this session, from one probe forward of a batch at the largest bucket.

    Call with the model loaded, inside fp8_base / autocast as training will run.
    """
    from .memory import estimate_peak_bytes, probe_activations
    from .precision import autocast

    dm = denoiser.model.diffusion_model
    device = denoiser.device
    ex = max(examples, key=lambda e: e.latents[0].numel())
    x0 = ex.latents[0][None].to(device, torch.float32).expand(batch_size, *ex.latents[0].shape).contiguous()
    sigma = denoiser.sigma_from_u(torch.full((batch_size,), 0.5, device=device))
    x = denoiser.noise_input(x0, torch.zeros_like(x0), sigma)

    def forward():
        with autocast(precision, device), network.applied():
            denoiser.denoise(x, sigma, [ex.conds[0]] * batch_size)

    profile = probe_activations(forward, checkpoint_blocks(dm, denoiser.profile), exclude=list(dm.parameters()) + list(dm.buffers()), batch=batch_size)
    return estimate_peak_bytes(
        resident_bytes(dm),
        [p.numel() for p in network.parameters() if p.requires_grad],
        optimizer,
        profile,
        batch_size,
        precision.gradient_checkpointing,
        snapshot_on_device=device.type == "cpu",
        dataset_bytes=_dataset_bytes(examples) if device.type == "cpu" else 0,
        extra={"fp8 originals": _fp8_original_bytes(dm)} if device.type == "cpu" and precision.fp8_base else None,
    )


def _fp8_original_bytes(diffusion_model: torch.nn.Module) -> int:
    """The exact copies fp8_base keeps in host memory (the same memory when training on CPU)."""
    from .fp8 import FP8_DTYPE

    itemsize = torch.empty((), dtype=getattr(diffusion_model, "dtype", None) or torch.float32).element_size()
    return sum(m.weight.numel() * itemsize for m in diffusion_model.modules() if hasattr(m, "weight_fp8_scale") and m.weight.dtype == FP8_DTYPE)


def _dataset_bytes(examples) -> int:
    seen, total = set(), 0
    for ex in examples:
        tensors = list(ex.latents) + [v for c in ex.conds if isinstance(c, dict) for v in c.values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += key[1]
    return total


def free_memory_bytes(device: torch.device) -> int:
    """What ComfyUI reports as free on the device (VRAM plus its allocator cache; RAM on CPU)."""
    return int(comfy.model_management.get_free_memory(device))


def apply_lora(model, clip, weights: dict[str, torch.Tensor], strength_model: float, strength_clip: float = 0.0):
    """(MODEL, CLIP) with a kohya-format LoRA, exactly as ComfyUI's LoraLoader applies it.

    Without a CLIP the text-encoder part of the LoRA is left out (rather than reported by
    ComfyUI as "not loaded"); the CLIP comes back as given."""
    return comfy.sd.load_lora_for_models(model, clip, _applicable(weights, clip), strength_model, strength_clip)


def _applicable(weights: dict[str, torch.Tensor], clip) -> dict[str, torch.Tensor]:
    """The part of a LoRA that can be applied: without a CLIP, the UNet part only."""
    return weights if clip is not None else {k: v for k, v in weights.items() if not is_text_encoder(k)}


def family_name(model) -> str:
    """The model family in the user's words ("SD1.5", "SDXL", "Flux"), or ComfyUI's config name for others."""
    try:
        return detect(model).label
    except ConfigError:
        return type(model.model_config).__name__


# What follows a module's name in a LoRA file's keys, for every adapter kind ComfyUI reads.
_ADAPTER_PART = re.compile(
    r"\.(lora_up|lora_down|lora_mid|lora_A|lora_B|lora\.up|lora\.down|lora_linear_layer\.up|lora_linear_layer\.down"
    r"|alpha|dora_scale|hada_\w+|lokr_\w+|oft_\w+|diff|diff_b|set_weight|reshape_weight|w_norm|b_norm|rescale|on_input)(\.weight)?$"
)


@dataclass(frozen=True)
class LoRAFit:
    modules: int  # modules in the file (that can apply: without a CLIP, the UNet part)
    matched: int  # of those, names the MODEL/CLIP has (ComfyUI's key maps)
    fit: int  # of those, with the layer's sizes


def lora_modules(weights) -> set[str]:
    """The module names of a LoRA file's keys ("lora_unet_x.lora_up.weight" -> "lora_unet_x")."""
    return {k[: m.start()] if (m := _ADAPTER_PART.search(k)) else k for k in weights}


def lora_fit(model, clip, weights: dict[str, torch.Tensor]) -> LoRAFit:
    """How much of this LoRA `apply_lora` would really apply.

    Names are matched by ComfyUI's own key maps, and a kohya lora_up / lora_down pair fits when
    its outer sizes are the layer's. A LoRA made for another model family fits nothing: ComfyUI
    would then log every key as "not loaded" and return the model unchanged.
    """
    import comfy.lora_convert

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        shapes.update((k, tuple(v.shape)) for k, v in clip.cond_stage_model.state_dict().items())
    converted = comfy.lora_convert.convert_lora(_applicable(weights, clip))
    try:
        patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
    except TypeError:  # a ComfyUI without the log_missing switch (it then only logs)
        patches = comfy.lora.load_lora(converted, key_map)
    modules = lora_modules(converted)
    fit = sum(1 for key, patch in patches.items() if _patch_fits(patch, key, shapes))
    matched = max(len(patches), sum(1 for m in modules if m in key_map))
    return LoRAFit(max(len(modules), matched), matched, fit)


def _patch_fits(patch, key, shapes: dict) -> bool:
    if isinstance(key, tuple):  # a slice of a fused weight (diffusers-style names for Flux's qkv)
        return key[0] in shapes
    shape = shapes.get(key)
    if shape is None:
        return False
    try:
        if getattr(patch, "name", None) != "lora" or patch.weights[5] is not None:
            return True  # other adapter kinds (LoHa, LoKr, diff, ...) and reshaped LoRAs: ComfyUI checks them itself
        up, down = patch.weights[0], patch.weights[1]
        return len(shape) >= 2 and up.shape[0] == shape[0] and down.shape[1] == shape[1]
    except (AttributeError, IndexError, TypeError):  # another ComfyUI's patch layout: the name matched, trust it
        return True
