"""The example training + test workflows of every profiled family, in ComfyUI's API format, from one set of options.

    prompt = training_prompt(TrainingOptions(checkpoint=..., dataset=..., family="sdxl"))

The headless command (`python <pack folder> train ...`) queues exactly this graph, and
example_workflows/train_<family>_lora.json is its UI-format twin (a test checks they agree), so the
command line, the templates and the integration tests all run the same workflow.

What differs per family is data in the family's profile (trainer/profiles.py: `Workflow` and
`FamilyDefaults`): the loaders (CheckpointLoaderSimple; or UNETLoader with CLIPLoader /
DualCLIPLoader / TripleCLIPLoader and VAELoader), the test latent and sampler settings, whether the
test prompt has a negative (Flux-dev samples at cfg 1.0 with a zeroed one, as ComfyUI's own examples
do) or a guidance value (FluxGuidance), and the training defaults (resolution, timesteps, precision).

Options left at None take the family's default (FAMILY_DEFAULTS). Inputs that no option sets are in
FIXED_INPUTS, per node class: a new node input with a default is added there, once.

No ComfyUI imports: this is data. The options' defaults are the engine's config defaults (the
same the nodes' widgets show), read from the config classes, so a default is written once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from trainer.network import NetworkConfig
from trainer.optimizers import OptimizerConfig
from trainer.precision import PrecisionConfig
from trainer.profiles import PROFILES, Profile, profile_for
from trainer.schedule import ScheduleConfig
from trainer.spec import TrainConfig

# Node ids, stable so tests and the UI twin can refer to them.
CKPT, DATASET, NETWORK, OPTIMIZER, PRECISION, TRAIN, SAVE, REPORT, REPORT_SAVE = "1", "2", "3", "4", "5", "6", "7", "8", "9"
POS, NEG, LATENT, SWEEP, SWEEP_SAVE, PREVIEW = "10", "11", "12", "13", "14", "15"
CLIP_LOADER, VAE_LOADER, GUIDANCE = "16", "17", "18"  # separate text-encoder and VAE files, FluxGuidance

FAMILIES = tuple(p.key for p in PROFILES if p.workflow)


def _defaults(p: Profile) -> dict:
    d, w = p.defaults, p.workflow
    return {"resolution": d.resolution, "test_size": d.resolution, "test_steps": w.test_steps, "test_cfg": w.test_cfg,
            "test_scheduler": w.test_scheduler, "save_dtype": d.save_dtype, "fp8_base": d.fp8_base,
            "timestep_sampling": d.timestep_sampling, "mixed_precision": d.mixed_precision,
            "vae": w.vae_file or None, "weight_dtype": w.weight_dtype, "text_encoder": w.text_encoder_file or None,
            "frames": w.frames}


# What "None" means per family, from the profiles.
FAMILY_DEFAULTS = {key: _defaults(profile_for(key)) for key in FAMILIES}

# Inputs no option sets, per node class (merged under the inputs the builder sets).
FIXED_INPUTS = {
    "LoRALabDataset": {"bucket": True},
    "LoRALabNetwork": {k: getattr(NetworkConfig, k) for k in ("targets", "conv_rank", "conv_alpha", "dropout")},
    "LoRALabOptimizer": {"text_encoder_lr": OptimizerConfig.text_encoder_lr, "weight_decay": OptimizerConfig.weight_decay,
                         **{k: getattr(ScheduleConfig, k) for k in ("warmup_steps", "min_lr_ratio", "cycles", "power")}},
    "LoRALabPrecision": {"max_grad_norm": PrecisionConfig.max_grad_norm},
    "LoRALabTrain": {"gradient_accumulation": TrainConfig.gradient_accumulation, "mode": "continue"},
    "LoRALabSaveLoRA": {"overwrite": False},
    "LoRALabTrainingReport": {"width": 1024, "height": 640},
    "LoRALabStrengthSweep": {"sampler_name": "euler"},
    "LoRALabPreview": {"sampler_name": "euler"},
    "EmptyLatentImage": {"batch_size": 1},
    "EmptySD3LatentImage": {"batch_size": 1},
    "EmptyHunyuanLatentVideo": {"batch_size": 1},
    "DualCLIPLoader": {"device": "default"},
    "CLIPLoader": {"device": "default"},
}
NEGATIVE_PROMPT = "blurry, low quality"


@dataclass(frozen=True)
class TrainingOptions:
    checkpoint: str  # the family's model file: models/checkpoints, or models/diffusion_models for UNETLoader families
    dataset: str
    family: str = "sd15"
    output_name: str = "my_lora"
    resolution: int | None = None
    repeats: int = 1
    trigger_word: str = ""
    rank: int = NetworkConfig.rank
    alpha: float = NetworkConfig.alpha
    optimizer: str = OptimizerConfig.name
    unet_lr: float = OptimizerConfig.unet_lr
    scheduler: str = ScheduleConfig.name
    warmup_ratio: float = ScheduleConfig.warmup_ratio
    mixed_precision: str | None = None
    fp8_base: bool | None = None
    gradient_checkpointing: bool = PrecisionConfig.gradient_checkpointing
    save_dtype: str | None = None
    steps: int = TrainConfig.steps
    batch_size: int = TrainConfig.batch_size
    seed: int = TrainConfig.seed
    min_snr_gamma: float = 0.0
    timestep_sampling: str | None = None
    validation_split: float = TrainConfig.validation_split
    test_prompt: str = "a photo"
    strengths: str = "0, 0.5, 1.0, 1.5, 1.8"
    test_steps: int | None = None
    test_cfg: float | None = None
    test_scheduler: str | None = None
    test_size: int | None = None
    preview_every: int = 0  # > 0: the Train node samples the test prompt every N steps
    # Text-encoder files (models/text_encoders) of the families that load them apart (profile.workflow.text_encoders)
    clip_l: str = "clip_l.safetensors"
    clip_g: str = "clip_g.safetensors"
    t5xxl: str = "t5xxl_fp16.safetensors"  # t5xxl_fp8_e4m3fn.safetensors needs less memory
    text_encoder: str | None = None  # single-encoder families: Qwen-Image's Qwen2.5-VL, Wan's umT5
    vae: str | None = None  # models/vae, for families whose VAE is its own file (Flux, Chroma: ae.safetensors)
    weight_dtype: str | None = None  # UNETLoader: fp8_e4m3fn holds the diffusion model in fp8 from the start
    guidance: float = 1.0  # families conditioned on guidance (Flux-dev): the value while training
    test_guidance: float = 3.5  # FluxGuidance of the test prompt
    frames: int | None = None  # video families (Wan): frames per clip, training and test (4k+1)
    fps: float = 16.0  # video families: the rate clips are read at

    @property
    def profile(self) -> Profile:
        return profile_for(self.family)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family: {self.family!r} is not one of {', '.join(FAMILIES)}; pick the base model's family")
        for name, value in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)


def option_default(name: str):
    """The default of an option, as SD1.5 has it (FAMILY_DEFAULTS for those that depend on the
    family; the first family that has one, for files SD1.5 doesn't load apart)."""
    f = next(f for f in fields(TrainingOptions) if f.name == name)
    if f.default is not None:
        return f.default
    return next((FAMILY_DEFAULTS[k][name] for k in FAMILIES if FAMILY_DEFAULTS[k][name] is not None), None)


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": {**FIXED_INPUTS.get(class_type, {}), **inputs}}


def _loaders(o: TrainingOptions) -> tuple[dict, dict]:
    """The loader nodes and where MODEL, CLIP and VAE come from."""
    w = o.profile.workflow
    if w.model_loader == "UNETLoader":
        nodes = {CKPT: node("UNETLoader", unet_name=o.checkpoint, weight_dtype=o.weight_dtype)}
        src = {"model": [CKPT, 0]}
    else:
        nodes = {CKPT: node("CheckpointLoaderSimple", ckpt_name=o.checkpoint)}
        src = {"model": [CKPT, 0], "clip": [CKPT, 1], "vae": [CKPT, 2]}
    if w.clip_loader:
        files = {f"clip_name{i + 1}" if len(w.text_encoders) > 1 else "clip_name": getattr(o, name) for i, name in enumerate(w.text_encoders)}
        nodes[CLIP_LOADER] = node(w.clip_loader, **files, **({"type": w.clip_type} if w.clip_type else {}))
        src["clip"] = [CLIP_LOADER, 0]
    if w.vae_file:
        nodes[VAE_LOADER] = node("VAELoader", vae_name=o.vae)
        src["vae"] = [VAE_LOADER, 0]
    return nodes, src


def _training(o: TrainingOptions, src: dict) -> dict:
    train = dict(model=src["model"], dataset=[DATASET, 0], network=[NETWORK, 0], optimizer=[OPTIMIZER, 0],
                 precision=[PRECISION, 0], steps=o.steps, batch_size=o.batch_size, seed=o.seed,
                 output_name=o.output_name, min_snr_gamma=o.min_snr_gamma, validation_split=o.validation_split)
    if o.timestep_sampling != "uniform":
        train.update(timestep_sampling=o.timestep_sampling)
    if o.profile.guidance:
        train.update(guidance=o.guidance)
    return {
        DATASET: node("LoRALabDataset", folder=o.dataset, vae=src["vae"], clip=src["clip"], resolution=o.resolution,
                      repeats=o.repeats, trigger_word=o.trigger_word, **({"frames": o.frames, "fps": o.fps} if o.frames > 1 else {})),
        NETWORK: node("LoRALabNetwork", rank=o.rank, alpha=o.alpha),
        OPTIMIZER: node("LoRALabOptimizer", optimizer=o.optimizer, unet_lr=o.unet_lr, scheduler=o.scheduler,
                        warmup_ratio=o.warmup_ratio),
        PRECISION: node("LoRALabPrecision", mixed_precision=o.mixed_precision, fp8_base=o.fp8_base,
                        gradient_checkpointing=o.gradient_checkpointing, save_dtype=o.save_dtype),
        TRAIN: node("LoRALabTrain", **train),
        SAVE: node("LoRALabSaveLoRA", lora=[TRAIN, 1], filename=o.output_name),
        REPORT: node("LoRALabTrainingReport", history=[TRAIN, 2]),
        REPORT_SAVE: node("SaveImage", images=[REPORT, 0], filename_prefix=f"{o.output_name}_report"),
    }


def _test(o: TrainingOptions, src: dict) -> dict:
    """The test prompt, its negative and latent, and the strength sweep."""
    w = o.profile.workflow
    nodes = {POS: node("CLIPTextEncode", text=o.test_prompt, clip=src["clip"])}
    positive = [POS, 0]
    if o.profile.guidance:
        nodes[GUIDANCE] = node("FluxGuidance", conditioning=[POS, 0], guidance=o.test_guidance)
        positive = [GUIDANCE, 0]
    if w.negative:
        nodes[NEG] = node("CLIPTextEncode", text=NEGATIVE_PROMPT, clip=src["clip"])
    else:
        nodes[NEG] = node("ConditioningZeroOut", conditioning=[POS, 0])  # ignored at cfg 1.0
    nodes[LATENT] = node(w.latent, width=o.test_size, height=o.test_size, **({"length": o.frames} if o.frames > 1 else {}))
    nodes[SWEEP] = node("LoRALabStrengthSweep", model=src["model"], lora=[TRAIN, 1], positive=positive,
                        negative=[NEG, 0], vae=src["vae"], latent=[LATENT, 0], strengths=o.strengths, seed=o.seed,
                        steps=o.test_steps, cfg=o.test_cfg, scheduler=o.test_scheduler)
    nodes[SWEEP_SAVE] = node("SaveImage", images=[SWEEP, 0], filename_prefix=f"{o.output_name}_sweep")
    return nodes


def training_prompt(o: TrainingOptions) -> dict:
    """API-format prompt: train, save the LoRA, render the report, and sweep strengths."""
    loaders, src = _loaders(o)
    prompt = {**loaders, **_training(o, src), **_test(o, src)}
    if o.preview_every:
        # The same prompt, seed and sampler as the sweep: the last preview is the sweep's 1.0 cell.
        sweep = prompt[SWEEP]["inputs"]
        prompt[PREVIEW] = node("LoRALabPreview", **{k: sweep[k] for k in (
            "positive", "negative", "vae", "latent", "seed", "steps", "cfg", "sampler_name", "scheduler")})
        prompt[TRAIN]["inputs"].update(preview=[PREVIEW, 0], preview_every=o.preview_every)
    return prompt


def options_dict(o: TrainingOptions) -> dict:
    return asdict(o)
