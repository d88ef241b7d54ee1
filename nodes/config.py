"""Network, Optimizer + Schedule and Precision nodes: forms that build the engine's config objects."""

from __future__ import annotations

from ..trainer.adapters import ALGORITHMS
from ..trainer.network import RANK_RANGE, TARGET_PRESETS, NetworkConfig
from ..trainer.optimizers import OPTIMIZERS, OptimizerConfig, check_available
from ..trainer.precision import AUTO, MIXED_PRECISIONS, SAVE_DTYPES, PrecisionConfig
from ..trainer.schedule import SCHEDULES, ScheduleConfig
from .common import CATEGORY, NETWORK, OPTIMIZER, PRECISION, default_of, user_errors


ALGORITHM_TOOLTIP = (
    "lora: the classic, works everywhere; the safe default. "
    "lokr: a Kronecker product of a small and a large block - far fewer parameters and small files for the same rank, "
    "good for styles; learns fine detail more slowly. "
    "loha: two low-rank pairs multiplied element-wise - more expressive than lora at the same file size, good for "
    "styles with many details; each step costs more (it works at rank x rank internally). "
    "dora: lora plus a learned strength per input channel - often closer to a full fine-tune at low rank; slower steps "
    "(the layer's weight is read once more per step) and a slightly bigger file. "
    "All four load in ComfyUI's stock Load LoRA; lokr/loha/dora files are written in LyCORIS' format."
)


class LoRALabNetwork:
    DESCRIPTION = "The LoRA to train: algorithm (LoRA, LoKr, LoHa, DoRA), rank, alpha (strength scale = alpha / rank), which layers, 3x3 convs, dropout."
    CATEGORY = CATEGORY
    RETURN_TYPES = (NETWORK,)
    RETURN_NAMES = ("network",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        d, (lo, hi) = default_of(NetworkConfig), RANK_RANGE
        return {
            "required": {
                "rank": ("INT", {"default": d["rank"], "min": lo, "max": hi, "tooltip": "LoRA rank (network_dim). 4-32 is typical; higher learns more detail and makes bigger files."}),
                "alpha": ("FLOAT", {"default": d["alpha"], "min": 0.01, "max": float(hi), "step": 0.5, "tooltip": "Scale = alpha / rank. alpha = rank gives 1.0; alpha closer to rank means a STRONGER LoRA."}),
                "targets": (list(TARGET_PRESETS), {"default": d["targets"], "tooltip": "attn_mlp: every Linear and 1x1 conv in the transformer blocks (kohya default). attn_only: attention projections only."}),
                "conv_rank": ("INT", {"default": d["conv_rank"], "min": 0, "max": hi, "tooltip": "Rank for 3x3 convs in the ResNet blocks (LoCon-style). 0 = don't train them."}),
                "conv_alpha": ("FLOAT", {"default": d["conv_alpha"], "min": 0.01, "max": float(hi), "step": 0.5, "tooltip": "Alpha for the 3x3 convs (scale = conv_alpha / conv_rank)."}),
                "dropout": ("FLOAT", {"default": d["dropout"], "min": 0.0, "max": 0.9, "step": 0.01, "tooltip": "Dropout on the LoRA input during training. 0 = off; 0.05-0.1 can reduce over-fitting."}),
            },
            "optional": {
                "algorithm": (list(ALGORITHMS), {"default": d["algorithm"], "tooltip": ALGORITHM_TOOLTIP}),
                "lokr_factor": ("INT", {"default": d["lokr_factor"], "min": -1, "max": 1024, "tooltip": "LoKr only: each layer's weight is split into a small block of this size and a large one (Kronecker product). -1 = as square as possible (smallest file). Larger factors (8-16) give the small block more to learn; the file grows with it."}),
                "lokr_decompose": ("BOOLEAN", {"default": d["lokr_decompose"], "tooltip": "LoKr only: store the large block as a rank-r product (small file; alpha/rank scales it). Off = store it in full: more detail, much bigger file, and alpha no longer applies (ComfyUI ignores it for full blocks)."}),
                "train_text_encoder": ("BOOLEAN", {"default": d["train_text_encoder"], "tooltip": "Also train a LoRA on the text encoder (SD1.5: lora_te_; SDXL: both encoders, lora_te1_/lora_te2_; Flux: CLIP-L only), at the Optimizer's text_encoder_lr. Connect the CLIP to the Train node. Slower: captions are encoded every step. Off = UNet only, the usual choice."}),
            },
        }

    @user_errors
    def build(self, rank, alpha, targets, conv_rank, conv_alpha, dropout, train_text_encoder=False, algorithm="lora", lokr_factor=-1, lokr_decompose=True):
        return (NetworkConfig(rank=rank, alpha=alpha, targets=targets, conv_rank=conv_rank, conv_alpha=conv_alpha, dropout=dropout, train_text_encoder=train_text_encoder,
                              algorithm=algorithm, lokr_factor=lokr_factor, lokr_decompose=lokr_decompose),)


class LoRALabOptimizer:
    DESCRIPTION = "Optimizer and learning-rate schedule. unet_lr 1e-4 with AdamW/AdamW8bit and ~5% warmup is a good start."
    CATEGORY = CATEGORY
    RETURN_TYPES = (OPTIMIZER,)
    RETURN_NAMES = ("optimizer",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        o, s = default_of(OptimizerConfig), default_of(ScheduleConfig)
        return {
            "required": {
                "optimizer": (list(OPTIMIZERS), {"default": o["name"], "tooltip": "AdamW8bit/Lion8bit keep 8-bit state (less memory, needs bitsandbytes). Lion wants a 3-10x smaller lr. Prodigy sets its own step size: use lr 1.0."}),
                "unet_lr": ("FLOAT", {"default": o["unet_lr"], "min": 1e-7, "max": 10.0, "step": 1e-5, "round": False, "tooltip": "Learning rate of the UNet / transformer LoRA. 1e-4 for AdamW, ~3e-5 for Lion, 1.0 for Prodigy."}),
                "text_encoder_lr": ("FLOAT", {"default": o["text_encoder_lr"], "min": 1e-7, "max": 10.0, "step": 1e-5, "round": False, "tooltip": "Learning rate of the text-encoder LoRA (when it is trained); usually half the unet_lr or less."}),
                "weight_decay": ("FLOAT", {"default": o["weight_decay"], "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Decoupled weight decay (AdamW/Lion). 0.01 is usual; Lion likes 3-10x more."}),
                "scheduler": (list(SCHEDULES), {"default": s["name"], "tooltip": "How the lr changes over the run. cosine decays smoothly to min_lr_ratio; constant keeps it flat."}),
                "warmup_ratio": ("FLOAT", {"default": s["warmup_ratio"], "min": 0.0, "max": 0.5, "step": 0.01, "tooltip": "Warmup as a share of the total steps (~5% is usual). Ignored when warmup_steps > 0. Not used by 'constant'."}),
                "warmup_steps": ("INT", {"default": s["warmup_steps"], "min": 0, "max": 100000, "tooltip": "Warmup in optimizer steps; 0 = use warmup_ratio."}),
                "min_lr_ratio": ("FLOAT", {"default": s["min_lr_ratio"], "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "The lr decays to this share of the starting lr (0 = all the way to zero)."}),
                "cycles": ("INT", {"default": s["cycles"], "min": 1, "max": 100, "tooltip": "Restarts for cosine_with_restarts."}),
                "power": ("FLOAT", {"default": s["power"], "min": 0.01, "max": 10.0, "step": 0.1, "tooltip": "Exponent for the polynomial schedule (1 = linear)."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, optimizer):
        # Before anything runs: an optimizer whose library is missing or broken on this device
        # would otherwise stop the Train node only after the dataset was encoded.
        import comfy.model_management

        if optimizer is None:  # linked to another node's output: checked by the Train node when it runs
            return True
        problem = check_available(optimizer, comfy.model_management.get_torch_device())
        return f"optimizer: {problem}" if problem else True

    @staticmethod
    def _configs(optimizer, unet_lr, text_encoder_lr, weight_decay, scheduler, warmup_ratio, warmup_steps, min_lr_ratio, cycles, power):
        # Warmup rules ('constant' has none; warmup_steps wins over warmup_ratio) are the schedule's own.
        opt = OptimizerConfig(name=optimizer, unet_lr=unet_lr, text_encoder_lr=text_encoder_lr, weight_decay=weight_decay)
        sched = ScheduleConfig(name=scheduler, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio, cycles=cycles, power=power)
        return opt, sched

    @user_errors
    def build(self, **kw):
        return (self._configs(**kw),)


class LoRALabPrecision:
    DESCRIPTION = "Mixed precision, fp8 base weights, gradient checkpointing and the dtype the LoRA is saved in."
    CATEGORY = CATEGORY
    RETURN_TYPES = (PRECISION,)
    RETURN_NAMES = ("precision",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        d = default_of(PrecisionConfig)
        return {
            "required": {
                "mixed_precision": ([AUTO, *MIXED_PRECISIONS], {"default": d["mixed_precision"], "tooltip": "auto: bf16 on RTX 30xx+ / Ampere and newer GPUs, fp16 on older GPUs, fp32 on CPU. bf16: fast and stable on RTX 30xx+ GPUs. fp16: older GPUs, uses dynamic loss scaling. fp32: CPUs (no fast bf16 there) and debugging."}),
                "fp8_base": ("BOOLEAN", {"default": d["fp8_base"], "tooltip": "Keep the frozen base weights in fp8 (half the memory of bf16); the LoRA stays fp32. For Flux on 12-16 GB cards."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": d["gradient_checkpointing"], "tooltip": "Recompute activations in the backward pass: much less memory, ~20-30% slower."}),
                "save_dtype": (list(SAVE_DTYPES), {"default": d["save_dtype"], "tooltip": "dtype of the saved LoRA file. fp16 is what everyone loads."}),
                "max_grad_norm": ("FLOAT", {"default": d["max_grad_norm"], "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Gradient clipping; 0 = off. 1.0 keeps single bad batches from wrecking the LoRA."}),
            }
        }

    @user_errors
    def build(self, **kw):
        return (PrecisionConfig(**kw),)
