"""Model families as data: one profile per family, and a generic path for models without one.

A profile says, for one family of ComfyUI models:
    how it is recognised       the `comfy.model_base` class (walked most specific first, so Chroma,
                               a Flux subclass in ComfyUI, is Chroma) and, where classes are shared,
                               a check on the UNet config (SD1.5 and SD2 are both `BaseModel`)
    what is adapted            the block classes whose Linear / 1x1 layers get a LoRA, the blocks whose
                               3x3 convs do when conv_rank > 0
    how keys are named         "lora_unet_" + the module path with "_" (what ComfyUI reads for every
                               model), or the diffusers paths sd-scripts writes for SD1.x / SD2.x
    which text encoders train  the kohya prefixes of the CLIP parts that can take a LoRA
    how it is trained          the blocks gradient checkpointing recomputes, the blocks that update
                               activations in place, and its defaults (resolution, timesteps,
                               precision, save dtype)
    what the file says         ss_base_model_version and modelspec, as the reference trainer writes

The generic profile (`generic_profile`) serves any other image model whose model_sampling is eps, v
or flow: it adapts the Linear layers of the model's repeated blocks — every ModuleList of two or more
blocks of one class that holds Linear layers (not nested in another such list): the transformer
blocks of a DiT, double and single stream blocks alike.

No ComfyUI import: detection reads class names and the config dict, so this module is tested
without ComfyUI. Public API:
    PROFILES, Profile, FamilyDefaults
    detect(model) -> Profile            a ComfyUI BaseModel; ConfigError for audio / 3D / video
    profile_for(key) -> Profile         by key ("sd15", "qwen_image", ...)
    detect_file(tensor names) -> Profile | None   a model file's family (the headless --family default)
    generic_profile(model) -> Profile
    repeated_blocks(root) -> [(path, ModuleList)]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class FamilyDefaults:
    """What a family trains and samples at unless the user says otherwise (the headless command's
    and the README's defaults). timestep_sampling "flux_shift" is Flux's resolution-dependent shift;
    "shift" uses the Train node's flow_shift."""

    resolution: int = 1024
    timestep_sampling: str = "uniform"
    mixed_precision: str = "auto"
    save_dtype: str = "fp16"
    fp8_base: bool = False


@dataclass(frozen=True)
class Workflow:
    """How ComfyUI loads and samples the family: the example workflow and the headless command.

    The MODEL comes from `model_loader` (CheckpointLoaderSimple: models/checkpoints, with CLIP and
    VAE unless their own loaders are named; UNETLoader: models/diffusion_models). `text_encoders`
    names the headless options holding the text-encoder files, in the order `clip_loader` takes
    them. `file_keys`: tensor-name fragments that identify the family's model file, all present."""

    model_file: str
    file_keys: tuple[str, ...]
    model_loader: str = "CheckpointLoaderSimple"
    clip_loader: str = ""  # "", CLIPLoader, DualCLIPLoader or TripleCLIPLoader
    clip_type: str = ""
    text_encoders: tuple[str, ...] = ()
    vae_file: str = ""  # "": the checkpoint's VAE
    weight_dtype: str = "default"
    latent: str = "EmptyLatentImage"
    test_steps: int = 20
    test_cfg: float = 7.0
    test_scheduler: str = "normal"
    negative: bool = True  # False: sampled at cfg 1 with a zeroed negative (Flux-dev)
    text_encoder_file: str = ""  # the default file of the "text_encoder" option (a single-encoder family)
    frames: int = 1  # video families: frames per training clip (the Dataset node) and per test clip


@dataclass(frozen=True)
class Profile:
    key: str  # stored in the file as lora_lab_family
    label: str  # the user's name of the family
    classes: tuple[str, ...]  # comfy.model_base class names this profile claims
    containers: tuple[str, ...]  # blocks whose Linear / 1x1-conv layers are adapted
    checkpoint_blocks: tuple[str, ...]  # attributes of diffusion_model holding the blocks checkpointing recomputes
    metadata: tuple[str, str, str]  # ss_base_model_version, modelspec.architecture, modelspec.implementation
    reference: str  # the trainer whose layer choice and key names this profile follows
    readers: str  # tools known to read the file
    defaults: FamilyDefaults = FamilyDefaults()
    match: Callable[[dict], bool] | None = None  # a check on the UNet config, for shared classes
    subclasses: bool = True  # also claims subclasses of `classes`
    conv_containers: tuple[str, ...] = ()
    diffusers_names: bool = False  # SD1.x / SD2.x: kohya names on diffusers paths
    text_encoders: tuple[str, ...] = ()  # kohya prefixes of the CLIP parts that can train
    inplace_blocks: tuple[str, ...] = ()  # blocks that update their inputs in place (`x += ...`)
    metadata_extra: dict = field(default_factory=dict)
    guidance: bool = False  # conditioned on a guidance value (Flux-dev): the Train node's guidance input
    variant: Callable[[object, dict], dict] | None = None  # (model, UNet config) -> fields that differ per model
    workflow: Workflow | None = None
    generic: bool = False


def _sd2_variant(model, config: dict) -> dict:
    """768-v (v-prediction) or 512 base, as sd-scripts records them."""
    v = any(c.__name__ == "V_PREDICTION" for c in type(getattr(model, "model_sampling", None)).__mro__)
    if not v:
        return {}
    return {"metadata": ("sd_v2_v", "stable-diffusion-v2-768-v", "diffusers"),
            "metadata_extra": {"ss_v2": "True", "modelspec.prediction_type": "v"}}


def _sd3_variant(model, config: dict) -> dict:
    """SD3.5 large (38 blocks), SD3.5 medium (MMDiT-X: self-attention in x blocks) or SD3 medium."""
    if config.get("depth") == 38:
        return {}
    kind = "5-medium" if config.get("x_block_self_attn_layers") else "medium"
    arch = "stable-diffusion-3-5-medium" if kind == "5-medium" else "stable-diffusion-3-medium"
    return {"metadata": (kind, arch, "diffusers"), "label": "SD3.5" if kind == "5-medium" else "SD3"}


def _wan_variant(model, config: dict) -> dict:
    """Wan 2.2 TI2V 5B (48 latent channels) or Wan 2.1 T2V."""
    return {"label": "Wan 2.2 5B"} if config.get("out_dim") == 48 else {"label": "Wan 2.1/2.2 T2V"}


UNET = ("SpatialTransformer", "SpatialVideoTransformer")
UNET_CONV = ("ResBlock", "Downsample", "Upsample")
UNET_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
FLUX_BLOCKS = ("DoubleStreamBlock", "SingleStreamBlock")

PROFILES: tuple[Profile, ...] = (
    Profile(
        "sd15", "SD1.5", ("BaseModel",), UNET, UNET_BLOCKS, ("sd_v1", "stable-diffusion-v1", "diffusers"),
        reference="kohya sd-scripts", readers="ComfyUI, A1111/Forge, diffusers, kohya",
        defaults=FamilyDefaults(resolution=512), match=lambda c: c.get("context_dim") == 768, subclasses=False,
        conv_containers=UNET_CONV, diffusers_names=True, text_encoders=("lora_te_",),
        workflow=Workflow("v1-5-pruned-emaonly.safetensors", ("cond_stage_model.transformer.text_model", "model.diffusion_model.input_blocks"))),
    Profile(
        "sd2", "SD2.x", ("BaseModel",), UNET, UNET_BLOCKS, ("sd_v2", "stable-diffusion-v2-512", "diffusers"),
        reference="kohya sd-scripts", readers="ComfyUI, A1111/Forge, kohya",
        defaults=FamilyDefaults(resolution=768), match=lambda c: c.get("context_dim") == 1024, subclasses=False,
        conv_containers=UNET_CONV, diffusers_names=True, metadata_extra={"ss_v2": "True"}, variant=_sd2_variant,
        workflow=Workflow("v2-1_768-ema-pruned.safetensors", ("cond_stage_model.model.transformer", "model.diffusion_model.input_blocks"))),
    Profile(
        "sdxl", "SDXL", ("SDXL",), UNET, UNET_BLOCKS,
        ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models"),
        reference="kohya sd-scripts", readers="ComfyUI, A1111/Forge, diffusers, kohya",
        conv_containers=UNET_CONV, text_encoders=("lora_te1_", "lora_te2_"),
        workflow=Workflow("sd_xl_base_1.0.safetensors", ("label_emb.", "input_blocks.", "middle_block."), test_steps=25)),
    Profile(
        "sd3", "SD3.5", ("SD3",), ("JointBlock",), ("joint_blocks",),
        ("5-large", "stable-diffusion-3-5-large", "diffusers"),
        reference="kohya sd-scripts", readers="ComfyUI, kohya (diffusers does not read kohya SD3 names)",
        defaults=FamilyDefaults(timestep_sampling="shift", mixed_precision="bf16", save_dtype="bf16"), variant=_sd3_variant,
        workflow=Workflow("sd3.5_large.safetensors", ("joint_blocks.0.context_block.attn.qkv.weight",), clip_loader="TripleCLIPLoader",
                          text_encoders=("clip_l", "clip_g", "t5xxl"), latent="EmptySD3LatentImage", test_steps=28, test_cfg=4.5, test_scheduler="sgm_uniform")),
    Profile(
        # Chroma before Flux: it subclasses Flux in ComfyUI but has no guidance input and no
        # per-block modulation layers (one shared approximator, which is not trained).
        "chroma", "Chroma", ("Chroma",), FLUX_BLOCKS, ("double_blocks", "single_blocks"),
        ("chroma", "chroma", "https://huggingface.co/lodestones/Chroma"),
        reference="kohya sd-scripts (lora_flux, model type chroma)", readers="ComfyUI, kohya, diffusers (Flux loader)",
        metadata_extra={"ss_model_type": "chroma"},
        defaults=FamilyDefaults(timestep_sampling="flux_shift", mixed_precision="bf16", save_dtype="bf16", fp8_base=True),
        inplace_blocks=FLUX_BLOCKS,
        workflow=Workflow("chroma-unlocked-v48.safetensors", ("distilled_guidance_layer.", "double_blocks.", "single_blocks."), model_loader="UNETLoader",
                          clip_loader="CLIPLoader", clip_type="chroma", text_encoders=("t5xxl",), vae_file="ae.safetensors", weight_dtype="fp8_e4m3fn",
                          latent="EmptySD3LatentImage", test_steps=26, test_cfg=4.0, test_scheduler="simple")),
    Profile(
        "flux", "Flux", ("Flux",), FLUX_BLOCKS, ("double_blocks", "single_blocks"),
        ("flux1", "flux-1-dev", "https://github.com/black-forest-labs/flux"),
        reference="kohya sd-scripts", readers="ComfyUI, Forge, diffusers, kohya",
        defaults=FamilyDefaults(timestep_sampling="flux_shift", mixed_precision="bf16", save_dtype="bf16", fp8_base=True),
        text_encoders=("lora_te1_",), inplace_blocks=FLUX_BLOCKS, guidance=True,
        workflow=Workflow("flux1-dev.safetensors", ("double_blocks.0.img_attn.qkv.weight", "img_in.weight"), model_loader="UNETLoader",
                          clip_loader="DualCLIPLoader", clip_type="flux", text_encoders=("clip_l", "t5xxl"), vae_file="ae.safetensors",
                          weight_dtype="fp8_e4m3fn", latent="EmptySD3LatentImage", test_cfg=1.0, test_scheduler="simple", negative=False)),
    Profile(
        # musubi-tuner adapts every Linear of the blocks, the modulation layers (img_mod / txt_mod)
        # included: its exclusion pattern "_mod_" is matched against dotted paths, so it never applies.
        "qwen_image", "Qwen-Image", ("QwenImage",), ("QwenImageTransformerBlock",), ("transformer_blocks",),
        ("qwen_image", "Qwen-Image", "https://github.com/QwenLM/Qwen-Image"),
        reference="musubi-tuner", readers="ComfyUI, musubi-tuner, diffusers",
        defaults=FamilyDefaults(timestep_sampling="shift", mixed_precision="bf16", save_dtype="bf16", fp8_base=True),
        workflow=Workflow("qwen_image_fp8_e4m3fn.safetensors", ("txt_norm.weight", "transformer_blocks.0.img_mod.1.weight"), model_loader="UNETLoader",
                          clip_loader="CLIPLoader", clip_type="qwen_image", text_encoders=("text_encoder",), vae_file="qwen_image_vae.safetensors",
                          latent="EmptySD3LatentImage", test_cfg=2.5, test_scheduler="simple",
                          text_encoder_file="qwen_2.5_vl_7b_fp8_scaled.safetensors")),
    Profile(
        # Wan 2.1 T2V (1.3B, 14B; the two Wan 2.2 A14B experts load as this class too) and Wan 2.2
        # TI2V 5B (WAN22). musubi-tuner adapts every Linear of WanAttentionBlock. Image-to-video and
        # the Vace / Camera / S2V / Animate variants need their own conditioning: refused.
        "wan", "Wan", ("WAN21", "WAN22"), ("WanAttentionBlock",), ("blocks",),
        ("wan", "wan2.1", "https://github.com/Wan-Video/Wan2.1"),
        reference="musubi-tuner", readers="ComfyUI, musubi-tuner",
        defaults=FamilyDefaults(resolution=512, timestep_sampling="shift", mixed_precision="bf16", save_dtype="bf16", fp8_base=True),
        match=lambda c: c.get("model_type", "t2v") == "t2v", subclasses=False, variant=_wan_variant,
        workflow=Workflow("wan2.1_t2v_1.3B_fp16.safetensors", ("head.modulation", "blocks.0.self_attn.q.weight"), model_loader="UNETLoader",
                          clip_loader="CLIPLoader", clip_type="wan", text_encoders=("text_encoder",), vae_file="wan_2.1_vae.safetensors",
                          latent="EmptyHunyuanLatentVideo", test_steps=30, test_cfg=6.0, test_scheduler="simple",
                          text_encoder_file="umt5_xxl_fp8_e4m3fn_scaled.safetensors", frames=17)),
)

# Families that are not image / video diffusion: refused by name, whatever their sampling says.
NOT_IMAGE = {
    "StableAudio1": "audio", "ACEStep": "audio", "Hunyuan3Dv2": "3D", "Hunyuan3Dv2_1": "3D",
    "SV3D_u": "3D", "SV3D_p": "3D", "Stable_Zero123": "3D",
}
# Video models without a profile (and the Wan variants the Wan profile doesn't claim): refused.
VIDEO = ("WAN21", "HunyuanVideo", "LTXV", "GenmoMochi", "CosmosVideo", "SVD_img2vid")

GENERIC_KEY = "generic"


def profile_for(key: str) -> Profile:
    for p in PROFILES:
        if p.key == key:
            return p
    raise ConfigError("family", f"unknown family {key!r}; known: {', '.join(p.key for p in PROFILES)}.")


def detect_file(keys) -> Profile | None:
    """The family of a model file from its tensor names (safetensors header), or None. Most specific
    first (more fragments to match): Chroma's file also looks like Flux's, SDXL's like SD1.5's."""
    keys = list(keys)
    for p in sorted(PROFILES, key=lambda p: -len(p.workflow.file_keys) if p.workflow else 0):
        if p.workflow and all(any(f in k for k in keys) for f in p.workflow.file_keys):
            return p
    return None


def _config(model) -> dict:
    config = getattr(getattr(model, "model_config", None), "unet_config", None)
    return config if isinstance(config, dict) else {}


def detect(model) -> Profile:
    """The profile of a ComfyUI BaseModel: its class and bases, most specific first; the generic
    profile for any other image model. Audio, 3D and video models are refused, naming the model."""
    mro = [c.__name__ for c in type(model).__mro__]
    name = mro[0]
    config = _config(model)
    exact = _claimed(model, mro[:1], config)
    if exact is not None:
        return exact
    for cls in mro:
        if cls in NOT_IMAGE:
            raise ConfigError("model", f"this MODEL is {name}, a {NOT_IMAGE[cls]} model; LoRA Lab trains image models. Load an image model (SD1.5, SDXL, Flux, Qwen-Image, ...).")
        if cls in VIDEO:
            raise ConfigError("model", f"this MODEL is {name}, a video model LoRA Lab has no profile for (it trains Wan 2.1/2.2 text-to-video and TI2V 5B, "
                              "not image-to-video or the Vace/Camera/S2V/Animate variants). Load a Wan text-to-video model or an image model.")
    return _claimed(model, mro[1:], config, subclass=True) or generic_profile(model)


def _claimed(model, classes: list[str], config: dict, subclass: bool = False) -> Profile | None:
    for cls in classes:
        for p in PROFILES:
            if cls in p.classes and (p.subclasses or not subclass) and (p.match is None or p.match(config)):
                return replace(p, **p.variant(model, config)) if p.variant else p
    return None


def repeated_blocks(root: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The ModuleLists of two or more blocks of one class holding Linear layers, outermost only."""
    found: list[tuple[str, torch.nn.ModuleList]] = []
    for path, module in root.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if any(path.startswith(p + ".") for p, _ in found):
            continue
        classes = {type(m) for m in module}
        if len(classes) == 1 and any(isinstance(s, torch.nn.Linear) for s in module[0].modules()):
            found.append((path, module))
    return found


def generic_profile(model) -> Profile:
    """The profile of a model no profile knows: its repeated blocks, named as ComfyUI reads every model."""
    dm = getattr(model, "diffusion_model", model)
    blocks = repeated_blocks(dm)
    if not blocks:
        raise ConfigError("model", f"this MODEL ({type(model).__name__}) has no repeated transformer blocks LoRA Lab could adapt, and no profile; it can't be trained here.")
    classes = tuple(sorted({type(b[0]).__name__ for _, b in blocks}))
    return Profile(
        GENERIC_KEY, type(model).__name__, (type(model).__name__,), classes, tuple(p for p, _ in blocks),
        ("lora_lab_generic", type(model).__name__.lower(), "https://github.com/comfyanonymous/ComfyUI"),
        reference="none (generic path: ComfyUI's own key names)", readers="ComfyUI",
        inplace_blocks=classes, generic=True)


def describe(profile: Profile, n_targets: int) -> str:
    """The line the Train node shows about the family."""
    if profile.generic:
        return (f"{profile.label} has no LoRA Lab profile: trained by the generic path ({n_targets} Linear layers in "
                f"{', '.join(profile.containers)} blocks, keys named lora_unet_<module path>). ComfyUI's LoRA loaders read "
                "this file; other tools may not.")
    return f"{profile.label}: {n_targets} layers adapted as {profile.reference} does; read by {profile.readers}."
