"""The example training + test workflow, in ComfyUI's API format, built from one set of options.

The headless command (`python <pack folder> train ...`) queues exactly this graph, and
example_workflows/train_sd15_lora.json is its UI-format twin (a test checks they agree), so the
command line, the template and the integration tests all run the same workflow.

No ComfyUI imports: this is data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Node ids, stable so tests and the UI twin can refer to them.
CKPT, DATASET, NETWORK, OPTIMIZER, PRECISION, TRAIN, SAVE, REPORT, REPORT_SAVE = "1", "2", "3", "4", "5", "6", "7", "8", "9"
POS, NEG, LATENT, SWEEP, SWEEP_SAVE, PREVIEW = "10", "11", "12", "13", "14", "15"


@dataclass(frozen=True)
class TrainingOptions:
    checkpoint: str
    dataset: str
    output_name: str = "my_lora"
    resolution: int = 512
    repeats: int = 1
    trigger_word: str = ""
    rank: int = 16
    alpha: float = 16.0
    optimizer: str = "AdamW"
    unet_lr: float = 1e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    save_dtype: str = "fp16"
    steps: int = 500
    batch_size: int = 1
    seed: int = 42
    min_snr_gamma: float = 0.0
    validation_split: float = 0.0
    test_prompt: str = "a photo"
    strengths: str = "0, 0.5, 1.0, 1.5, 1.8"
    test_steps: int = 20
    test_cfg: float = 7.0
    test_size: int = 512
    preview_every: int = 0  # > 0: the Train node samples the test prompt every N steps


def training_prompt(o: TrainingOptions) -> dict:
    """API-format prompt: train, save the LoRA, render the report, and sweep strengths."""
    prompt = {
        CKPT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": o.checkpoint}},
        DATASET: {"class_type": "LoRALabDataset", "inputs": {
            "folder": o.dataset, "vae": [CKPT, 2], "clip": [CKPT, 1], "resolution": o.resolution,
            "bucket": True, "repeats": o.repeats, "trigger_word": o.trigger_word}},
        NETWORK: {"class_type": "LoRALabNetwork", "inputs": {
            "rank": o.rank, "alpha": o.alpha, "targets": "attn_mlp", "conv_rank": 0, "conv_alpha": 1.0, "dropout": 0.0}},
        OPTIMIZER: {"class_type": "LoRALabOptimizer", "inputs": {
            "optimizer": o.optimizer, "unet_lr": o.unet_lr, "text_encoder_lr": 5e-5, "weight_decay": 0.01,
            "scheduler": o.scheduler, "warmup_ratio": o.warmup_ratio, "warmup_steps": 0, "min_lr_ratio": 0.0,
            "cycles": 1, "power": 1.0}},
        PRECISION: {"class_type": "LoRALabPrecision", "inputs": {
            "mixed_precision": o.mixed_precision, "fp8_base": False, "gradient_checkpointing": o.gradient_checkpointing,
            "save_dtype": o.save_dtype, "max_grad_norm": 1.0}},
        TRAIN: {"class_type": "LoRALabTrain", "inputs": {
            "model": [CKPT, 0], "dataset": [DATASET, 0], "network": [NETWORK, 0], "optimizer": [OPTIMIZER, 0],
            "precision": [PRECISION, 0], "steps": o.steps, "batch_size": o.batch_size, "gradient_accumulation": 1,
            "seed": o.seed, "mode": "continue", "output_name": o.output_name, "min_snr_gamma": o.min_snr_gamma,
            "validation_split": o.validation_split}},
        SAVE: {"class_type": "LoRALabSaveLoRA", "inputs": {"lora": [TRAIN, 1], "filename": o.output_name, "overwrite": False}},
        REPORT: {"class_type": "LoRALabTrainingReport", "inputs": {"history": [TRAIN, 2], "width": 1024, "height": 640}},
        REPORT_SAVE: {"class_type": "SaveImage", "inputs": {"images": [REPORT, 0], "filename_prefix": f"{o.output_name}_report"}},
        POS: {"class_type": "CLIPTextEncode", "inputs": {"text": o.test_prompt, "clip": [CKPT, 1]}},
        NEG: {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": [CKPT, 1]}},
        LATENT: {"class_type": "EmptyLatentImage", "inputs": {"width": o.test_size, "height": o.test_size, "batch_size": 1}},
        SWEEP: {"class_type": "LoRALabStrengthSweep", "inputs": {
            "model": [CKPT, 0], "lora": [TRAIN, 1], "positive": [POS, 0], "negative": [NEG, 0], "vae": [CKPT, 2],
            "latent": [LATENT, 0], "strengths": o.strengths, "seed": o.seed, "steps": o.test_steps, "cfg": o.test_cfg,
            "sampler_name": "euler", "scheduler": "normal"}},
        SWEEP_SAVE: {"class_type": "SaveImage", "inputs": {"images": [SWEEP, 0], "filename_prefix": f"{o.output_name}_sweep"}},
    }
    if o.preview_every:
        # The same prompt, seed and sampler as the sweep: the last preview is the sweep's 1.0 cell.
        sweep = prompt[SWEEP]["inputs"]
        prompt[PREVIEW] = {"class_type": "LoRALabPreview", "inputs": {
            "positive": [POS, 0], "negative": [NEG, 0], "vae": [CKPT, 2], "latent": [LATENT, 0], "seed": o.seed,
            "steps": o.test_steps, "cfg": o.test_cfg, "sampler_name": sweep["sampler_name"], "scheduler": sweep["scheduler"]}}
        prompt[TRAIN]["inputs"].update(preview=[PREVIEW, 0], preview_every=o.preview_every)
    return prompt


def options_dict(o: TrainingOptions) -> dict:
    return asdict(o)
