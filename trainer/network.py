"""LoRA modules and the network that attaches them to a base model without changing it.

Math (per adapted module, Linear or Conv2d), for the default algorithm "lora":

    y = base(x) + strength * (alpha / rank) * up(down(dropout(x)))

LoKr, LoHa and DoRA (NetworkConfig.algorithm) are described in trainer/adapters.py.

`down` starts with Kaiming-uniform weights and `up` with zeros, so at step 0 the adapted model
computes exactly what the base model computes.

Public API:
    NetworkConfig          rank/alpha, conv rank/alpha, dropout, target preset, text-encoder switch
    Target                 (kohya name, module, kind) — what to adapt; the model adapter builds these
    find_targets(root, prefix, containers, ...)  -> list[Target]
    kohya_name(prefix, path)                     -> "lora_unet_down_blocks_0_..."
    is_text_encoder(name)                        -> True for lora_te* modules
    make_adapter(algorithm, base, ...)           one adapter: LoRA, LoKr, LoHa or DoRA (trainer.adapters)
    LoRANetwork(targets, config)                 all adapters; `with network.applied(): ...`
        .param_groups() -> {"unet": [...], "text_encoder": [...]}
        .to_kohya(dtype) -> dict[str, Tensor]      (trainer.io writes it)
        .load_kohya(weights)                        continue from a saved LoRA
        .strength                                   user factor on top of alpha/rank

Why hooks and not module replacement: ComfyUI's ModelPatcher.clone() shares the underlying
modules between every graph that uses the same checkpoint. Replacing Linears in place (what
`peft.inject_adapter_in_model` does) would change the model for every other node in the workflow,
including the "original MODEL" the user compares against. Forward hooks registered only inside
`applied()` touch the shared modules for the duration of our own forward pass and leave no trace;
peft is therefore not used (its DoRA/config semantics are not needed for kohya-format LoRA).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .adapters import ALGORITHMS, Adapter, DoRAModule, LoRAModule, make_adapter  # noqa: F401 (LoRAModule re-exported)
from .errors import ConfigError, LoRALabError

# Which modules are adapted, by preset. Each preset filters the Linear / 1x1-conv leaves found
# inside the model's "container" blocks (transformer blocks for UNets, attention/MLP for text
# encoders, double/single stream blocks for Flux). 3x3 convs are adapted only with conv_rank > 0.
TARGET_PRESETS = {
    # sd-scripts' default: every Linear and 1x1 conv inside the transformer blocks.
    "attn_mlp": None,
    # Attention projections only: smaller files, weaker effect on style.
    # Matched against the path inside the container (attn1.to_q, self_attn.q_proj, img_attn.qkv);
    # Flux's single blocks fuse attention and MLP in one Linear, so they are left out here.
    "attn_only": re.compile(r"attn|attention"),
}

KINDS = ("linear", "conv", "conv3x3")
RANK_RANGE = (1, 1024)  # rank and conv_rank (conv_rank may also be 0: 3x3 convs not trained)


@dataclass(frozen=True)
class NetworkConfig:
    rank: int = 16
    alpha: float = 16.0
    conv_rank: int = 0
    conv_alpha: float = 1.0
    dropout: float = 0.0
    targets: str = "attn_mlp"
    train_text_encoder: bool = False
    algorithm: str = "lora"  # lora, lokr, loha, dora (trainer.adapters)
    lokr_factor: int = -1  # LoKr: size of the small Kronecker factor; -1 = as square as possible
    lokr_decompose: bool = True  # LoKr: the larger factor as a rank-r product (alpha applies) or full

    def __post_init__(self):
        lo, hi = RANK_RANGE
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not lo <= self.rank <= hi:
            raise ConfigError("rank", f"must be a whole number from {lo} to {hi}, got {self.rank!r}; 4-32 is typical ({NetworkConfig.rank} is a good start).")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError("alpha", f"must be > 0, got {self.alpha!r}; strength scale is alpha/rank, so alpha = rank gives 1.0 and alpha = rank/2 gives 0.5.")
        if not isinstance(self.conv_rank, int) or isinstance(self.conv_rank, bool) or not (self.conv_rank == 0 or lo <= self.conv_rank <= hi):
            raise ConfigError("conv_rank", f"must be 0 (3x3 convs not trained) or {lo} to {hi}, got {self.conv_rank!r}.")
        if self.conv_rank and (not math.isfinite(self.conv_alpha) or self.conv_alpha <= 0):
            raise ConfigError("conv_alpha", f"must be > 0 when conv_rank is set, got {self.conv_alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout!r}; 0 (off) or 0.05-0.1 are usual.")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError("algorithm", f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}.")
        if not isinstance(self.lokr_factor, int) or (self.lokr_factor < 1 and self.lokr_factor != -1):
            raise ConfigError("lokr_factor", f"must be -1 (automatic) or a whole number from 1 up, got {self.lokr_factor!r}; 4-16 is usual.")
        if self.targets not in TARGET_PRESETS:
            raise ConfigError("targets", f"unknown preset {self.targets!r}; choose one of {', '.join(TARGET_PRESETS)}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def network_args(self) -> dict[str, str]:
        """LyCORIS' ss_network_args for this algorithm (strings, as its command line records them)."""
        if self.algorithm == "lora":
            return {}
        if self.algorithm == "dora":
            return {"algo": "lora", "dora_wd": "True", "wd_on_out": "False"}
        args = {"algo": self.algorithm}
        if self.algorithm == "lokr":
            args.update(factor=str(self.lokr_factor), full_matrix=str(not self.lokr_decompose))
        return args


@dataclass(frozen=True)
class Target:
    """One module to adapt. `name` is its kohya name (lora_unet_..., lora_te_...)."""

    name: str
    module: nn.Module
    kind: str  # "linear", "conv" (1x1) or "conv3x3" (any other kernel size)


def is_text_encoder(name: str) -> bool:
    """A kohya module name of the text encoder (lora_te_, lora_te1_, lora_te2_ ...), not the UNet."""
    return name.startswith("lora_te")


def kohya_name(prefix: str, path: str) -> str:
    """`lora_unet` + `down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return f"{prefix}_{path.replace('.', '_')}"


def module_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv" if tuple(module.kernel_size) == (1, 1) else "conv3x3"
    return None


def find_targets(
    root: nn.Module,
    prefix: str,
    containers: Iterable[str],
    conv_containers: Iterable[str] = (),
    config: NetworkConfig | None = None,
    rename: Callable[[str], str | None] | None = None,
) -> list[Target]:
    """Leaves to adapt inside `root`.

    containers: class names whose Linear / 1x1-conv leaves are adapted (e.g. "SpatialTransformer").
    conv_containers: class names whose 3x3 convs are adapted when config.conv_rank > 0 ("ResBlock").
    rename: maps a module path inside root to the path used in the kohya name (e.g. ComfyUI's LDM
        path to the diffusers path sd-scripts writes for SD1.5); returning None skips the module.
    """
    config = config or NetworkConfig()
    containers, conv_containers = set(containers), set(conv_containers)
    pattern = TARGET_PRESETS[config.targets]
    found: dict[str, Target] = {}
    for cpath, container in root.named_modules():
        cls = type(container).__name__
        if cls not in containers and cls not in conv_containers:
            continue
        for lpath, leaf in container.named_modules():
            kind = module_kind(leaf)
            if kind is None:
                continue
            path = f"{cpath}.{lpath}" if cpath and lpath else (cpath or lpath)
            wanted = (cls in containers and kind in ("linear", "conv")) or (
                cls in conv_containers and kind == "conv3x3" and config.conv_rank > 0
            )
            if not wanted or (pattern is not None and kind != "conv3x3" and not pattern.search(lpath)):
                continue
            mapped = rename(path) if rename else path
            if mapped is None:
                continue
            name = kohya_name(prefix, mapped)
            found.setdefault(name, Target(name, leaf, kind))
    return list(found.values())


class LoRANetwork(nn.Module):
    """All LoRA modules of one training session, keyed by kohya name."""

    def __init__(self, targets: list[Target], config: NetworkConfig):
        super().__init__()
        if not targets:
            raise LoRALabError("no layers to train were found in this model: the target preset matched nothing.")
        self.config = config
        self.strength = 1.0
        self.loras = nn.ModuleDict()
        self._bases: dict[str, nn.Module] = {}
        for t in targets:
            rank, alpha = (config.conv_rank, config.conv_alpha) if t.kind == "conv3x3" else (config.rank, config.alpha)
            self.loras[t.name] = make_adapter(config.algorithm, t.module, rank, alpha, config.dropout, config.lokr_factor, config.lokr_decompose)
            self._bases[t.name] = t.module
        self._applied = False

    def _hook(self, name: str):
        lora = self.loras[name]
        if isinstance(lora, DoRAModule):
            return self._dora_hooks(name, lora)

        def hook(module, args, output):
            return output + lora(args[0], self.strength).to(output.dtype)

        return hook

    def _dora_hooks(self, name: str, dora: DoRAModule):
        """DoRA rescales the layer's input (h = 1 + s(g - 1)) before it runs and adds s·ΔW(g ⊙ x) after."""
        pending: list = []

        def pre(module, args):
            x = args[0]
            gain = dora.input_gain(module)
            h = 1 + self.strength * (gain - 1)
            pending.append((x, gain))
            return (x * dora.gain_view(h, x).to(x.dtype), *args[1:])

        def post(module, args, output):
            x, gain = pending.pop()
            return output + dora.forward_scaled(x, gain, self.strength).to(output.dtype)

        return pre, post

    @contextmanager
    def applied(self) -> Iterator["LoRANetwork"]:
        """Adds the LoRA to the base modules' outputs for the duration of the block only."""
        if self._applied:
            yield self
            return
        handles = []
        for name, base in self._bases.items():
            hook = self._hook(name)
            if isinstance(hook, tuple):
                handles.append(base.register_forward_pre_hook(hook[0]))
                hook = hook[1]
            handles.append(base.register_forward_hook(hook))
        self._applied = True
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._applied = False

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"unet": [], "text_encoder": []}
        for name, lora in self.loras.items():
            groups["text_encoder" if is_text_encoder(name) else "unet"].extend(lora.parameters())
        return groups

    def to_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The file's tensors in the format ComfyUI reads for the algorithm: NAME.lora_down.weight /
        NAME.lora_up.weight (+ NAME.dora_scale), NAME.hada_w1_a ..., NAME.lokr_w1 / NAME.lokr_w2(_a/_b),
        and NAME.alpha (0-dim float32) for every module."""
        out: dict[str, torch.Tensor] = {}
        for name, lora in self.loras.items():
            for key, t in lora.to_file().items():
                t = t.detach().to("cpu")
                if key == "alpha":
                    out[f"{name}.alpha"] = t.to(torch.float32).clone()
                else:
                    out[f"{name}.{key}"] = t.to(dtype) if dtype else t.clone()
        return out

    def load_kohya(self, weights: dict[str, torch.Tensor]) -> None:
        """Copies saved weights in; every module must be present with the same algorithm and shapes."""
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in weights.items():
            name, _, suffix = key.partition(".")
            parts.setdefault(name, {})[suffix] = t
        missing = [n for n in self.loras if n not in parts]
        if missing:
            raise LoRALabError(
                f"the LoRA to continue from lacks {len(missing)} of this network's {len(self.loras)} modules "
                f"(e.g. {missing[0]}); it was trained with other targets or for another model. "
                "Use the same network settings, or start a new LoRA."
            )
        for name, lora in self.loras.items():
            lora.load_file(name, parts[name])

    def rebind(self, targets: list[Target]) -> None:
        """Points the adapters at another instance of the same model (e.g. after ComfyUI reloaded
        the checkpoint). Every module must be there with the same shape, or nothing changes."""
        new = {t.name: t.module for t in targets}
        if set(new) != set(self._bases):
            raise LoRALabError(
                f"the model's layers differ from the ones this LoRA was trained on ({len(set(new) ^ set(self._bases))} "
                "differ); continue with the same model, or restart the training."
            )
        for name, module in new.items():
            old = self._bases[name]
            if getattr(old, "weight", None) is not None and tuple(old.weight.shape) != tuple(module.weight.shape):
                raise LoRALabError(f"{name}: layer shape changed; continue with the same model, or restart the training.")
        self._bases = new

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
