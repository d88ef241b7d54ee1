"""ComfyUI node classes (V1 API): thin forms over the engine in trainer/."""

from .config import LoRALabNetwork, LoRALabOptimizer, LoRALabPrecision
from .dataset import LoRALabDataset
from .lora import LoRALabApplyLoRA, LoRALabSaveLoRA, LoRALabStrengthSweep
from .preview import LoRALabPreview
from .report import LoRALabEvaluate, LoRALabTrainingReport
from .train import LoRALabTrain

NODE_CLASS_MAPPINGS = {
    "LoRALabDataset": LoRALabDataset,
    "LoRALabNetwork": LoRALabNetwork,
    "LoRALabOptimizer": LoRALabOptimizer,
    "LoRALabPrecision": LoRALabPrecision,
    "LoRALabTrain": LoRALabTrain,
    "LoRALabPreview": LoRALabPreview,
    "LoRALabApplyLoRA": LoRALabApplyLoRA,
    "LoRALabStrengthSweep": LoRALabStrengthSweep,
    "LoRALabSaveLoRA": LoRALabSaveLoRA,
    "LoRALabTrainingReport": LoRALabTrainingReport,
    "LoRALabEvaluate": LoRALabEvaluate,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRALabDataset": "LoRA Lab Dataset",
    "LoRALabNetwork": "LoRA Lab Network (rank/alpha)",
    "LoRALabOptimizer": "LoRA Lab Optimizer + Schedule",
    "LoRALabPrecision": "LoRA Lab Precision",
    "LoRALabTrain": "LoRA Lab Train",
    "LoRALabPreview": "LoRA Lab Preview (while training)",
    "LoRALabApplyLoRA": "LoRA Lab Apply LoRA",
    "LoRALabStrengthSweep": "LoRA Lab Strength Sweep",
    "LoRALabSaveLoRA": "LoRA Lab Save LoRA",
    "LoRALabTrainingReport": "LoRA Lab Training Report",
    "LoRALabEvaluate": "LoRA Lab Evaluate (PSNR/SSIM)",
}

from . import routes  # noqa: F401,E402  (registers HTTP routes for the browser extension)
