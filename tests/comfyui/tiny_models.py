"""Tiny, seeded-random test assets for the real-ComfyUI integration tests.

``make_tiny_sd15_checkpoint`` writes a single-file SD1.5 checkpoint in the
original LDM key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.text_model.*``) that ComfyUI's stock
CheckpointLoaderSimple detects as SD1.5.

What can be shrunk, and what cannot (ComfyUI 0.3.x):

* UNet: SD1.5 detection (``comfy.supported_models.SD15``) only pins
  ``model_channels == 320``, ``context_dim == 768``, conv (not linear)
  proj_in and no ADM / temporal layers. Levels, res blocks and transformer
  depth are read from the state dict, so we use one level, one res block,
  transformer depth 1 everywhere (incl. the middle block).
* VAE: the SD VAE config is hard-coded in ``comfy/sd.py`` (ch 128,
  ch_mult [1, 2, 4, 4], 2 res blocks); a shorter ch_mult would be taken for
  the x4-upscaler VAE (4x instead of 8x), so the VAE is full size.
* CLIP-L: the config comes from ComfyUI's ``sd1_clip_config.json`` (12 layers,
  hidden 768, vocab 49408); missing layers would stay uninitialised, so the
  text encoder is full size too.

So the file is dominated by the fixed-size VAE and text encoder; the UNet is
what makes sampling cheap.

The tensor names/shapes are taken from ComfyUI's own model classes built on
the ``meta`` device (no memory, no compute), then filled from a seeded
generator. This module imports ``comfy`` only inside the functions that need
it, so the test process can import it for ``make_dataset`` without pulling
ComfyUI in; build checkpoints in a subprocess via the CLI:

    COMFYUI_PATH=/path/to/ComfyUI python tests/comfyui/tiny_models.py OUT.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_dataset import make_dataset  # noqa: E402,F401  (the tests import it from here too)
from pathlib import Path

# UNet config in the form ComfyUI's detect_unet_config() reconstructs it.
TINY_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "channel_mult": [1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    # SD15.unet_extra_config
    "num_heads": 8,
    "num_head_channels": -1,
}

SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}

# File / folder names the test server uses (models/checkpoints/<TINY_CKPT_NAME>, input/<DATASET_DIR_NAME>).
TINY_CKPT_NAME = "lora_lab_tiny_sd15.safetensors"
DATASET_DIR_NAME = "lora_lab_dataset"
SIZED_DIR = "lora_lab_sized"  # two odd-sized images for SDXL's size/crop conditioning

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."


def looks_like_comfyui(path) -> bool:
    if not path:
        return False
    p = Path(path)
    return (p / "main.py").is_file() and (p / "comfy").is_dir()


def _import_comfy(comfyui_path):
    """Make ComfyUI importable in *this* process (CPU only)."""
    comfyui_path = str(Path(comfyui_path).resolve())
    if not looks_like_comfyui(comfyui_path):
        raise RuntimeError(f"{comfyui_path!r} does not look like a ComfyUI checkout (no main.py / comfy/)")
    if comfyui_path not in sys.path:
        sys.path.insert(0, comfyui_path)
    import utils  # noqa: F401  ComfyUI's top-level package, before anything can shadow it
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.ops  # noqa: F401
    import comfy.clip_model  # noqa: F401
    import comfy.ldm.modules.diffusionmodules.openaimodel  # noqa: F401
    import comfy.ldm.models.autoencoder  # noqa: F401
    return comfy


def tiny_sd15_shapes(comfyui_path) -> dict:
    """name -> (shape tuple, torch dtype) of the tiny SD1.5 checkpoint, via ComfyUI's classes on 'meta'."""
    import torch
    comfy = _import_comfy(comfyui_path)
    ops = comfy.ops.disable_weight_init
    clip_cfg_path = Path(comfyui_path) / "comfy" / "sd1_clip_config.json"  # comfy/ is a namespace package
    clip_cfg = json.loads(clip_cfg_path.read_text())

    with torch.device("meta"):
        unet = comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(
            **TINY_UNET_CONFIG, dtype=torch.float32, operations=ops)
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
        clip = comfy.clip_model.CLIPTextModel(clip_cfg, torch.float32, None, ops)

    shapes = {}
    for prefix, module in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (CLIP_PREFIX, clip)):
        for k, v in module.state_dict().items():
            if prefix == CLIP_PREFIX and k == "text_projection.weight":
                continue  # real SD1.5 checkpoints do not carry it (ComfyUI pops it on save)
            shapes[prefix + k] = (tuple(v.shape), torch.float32)
    # present in real SD1.5 checkpoints; ComfyUI ignores it
    shapes[CLIP_PREFIX + "text_model.embeddings.position_ids"] = ((1, clip_cfg["max_position_embeddings"]), torch.int64)
    return shapes


def check_detected_as_sd15(comfyui_path, shapes) -> str:
    """Run ComfyUI's own model detection on (meta) tensors of these shapes; returns the model config class name."""
    import torch
    _import_comfy(comfyui_path)
    import comfy.model_detection
    sd = {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in shapes.items()}
    cfg = comfy.model_detection.model_config_from_unet(sd, UNET_PREFIX)
    name = type(cfg).__name__ if cfg is not None else "None"
    if name != "SD15":
        raise RuntimeError(f"tiny checkpoint is detected as {name}, not SD15")
    return name


def _init_tensor(name, shape, dtype, gen):
    import torch
    if dtype == torch.int64:  # position_ids
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:  # GroupNorm / LayerNorm scales
        return torch.ones(shape)
    std = 0.02
    if name.endswith("position_embedding.weight"):
        std = 0.01
    return torch.randn(shape, generator=gen) * std


def make_tiny_sd15_checkpoint(path, seed=0, comfyui_path=None, dtype="fp32") -> dict:
    """Write the tiny seeded SD1.5 checkpoint to ``path`` (.safetensors). Returns a small info dict.

    dtype: "fp32" (default) or "fp16" for the float tensors in the file.
    """
    import torch
    from safetensors.torch import save_file

    comfyui_path = comfyui_path or os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        raise RuntimeError("pass comfyui_path or set COMFYUI_PATH")
    t0 = time.perf_counter()
    shapes = tiny_sd15_shapes(comfyui_path)
    detected = check_detected_as_sd15(comfyui_path, shapes)

    out_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(int(seed))
    sd = {}
    counts = {"unet": 0, "vae": 0, "clip": 0}
    for name in sorted(shapes):  # sorted: the draw order (and so the weights) depends only on the seed
        shape, dt = shapes[name]
        t = _init_tensor(name, shape, dt, gen)
        if t.is_floating_point():
            t = t.to(out_dtype)
        sd[name] = t.contiguous()
        n = t.numel()
        if name.startswith(UNET_PREFIX):
            counts["unet"] += n
        elif name.startswith(VAE_PREFIX):
            counts["vae"] += n
        else:
            counts["clip"] += n

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(sd, str(tmp), metadata={"format": "pt", "lora_lab_test": "tiny-sd15", "seed": str(seed)})
    os.replace(tmp, path)
    return {
        "path": str(path),
        "detected": detected,
        "seed": int(seed),
        "dtype": dtype,
        "params": counts,
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ---------------------------------------------------------------- SDXL and Flux

# SDXL detection (comfy.supported_models.SDXL) pins model_channels 320, linear proj_in, context 2048,
# ADM 2816 and the per-input-block transformer depths [0, 0, 2, 2, 10, 10] (so 3 levels of 2 res
# blocks). Channel multipliers, output-block depths and the middle block are read from the weights:
# every level stays at 320 channels and the decoder/middle get depth 1, which keeps the UNet at
# ~140 M parameters (the real one has 2.6 B) while ComfyUI still loads it as SDXL.
TINY_SDXL_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "channel_mult": [1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "num_heads": -1,
    "num_head_channels": 64,
}
TINY_SDXL_UNET_NAME = "lora_lab_tiny_sdxl_unet.safetensors"  # models/diffusion_models/<this>

# Flux: ComfyUI's detection fixes hidden size 3072 / 24 heads, so a narrow Flux cannot come from a
# file; it is built in-process from ComfyUI's own Flux classes (`load_tiny_flux`). Text width 4096
# (T5-XXL), pooled 768 (CLIP-L), 16 latent channels and patch 2 are the real ones.
TINY_FLUX_CONFIG = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 128,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 2,
    "depth_single_blocks": 2,
    "axes_dim": [8, 28, 28],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
}
# The real widths with 1 double + 1 single block: the layout UNETLoader detects as Flux (dev).
FULL_WIDTH_FLUX_CONFIG = dict(TINY_FLUX_CONFIG, hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], depth=1, depth_single_blocks=1)

# Per family: text tokens, text width, pooled width, latent channels (what the stand-in encoders give).
ENCODER_DIMS = {"sdxl": (77, 2048, 1280, 4), "flux": (32, 4096, 768, 16)}


def _seeded_state_dict(module, seed, out_dtype=None, skip=()):
    import torch
    gen = torch.Generator().manual_seed(int(seed))
    sd = {}
    for name, v in sorted(module.state_dict().items()):
        if name in skip:
            continue
        t = _init_tensor(name, tuple(v.shape), v.dtype if not v.is_floating_point() else torch.float32, gen)
        if out_dtype is not None and t.is_floating_point():
            t = t.to(out_dtype)
        sd[name] = t.contiguous()
    return sd


def tiny_sdxl_unet(comfyui_path, device="meta"):
    import torch
    comfy = _import_comfy(comfyui_path)
    with torch.device(device):
        return comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(
            **TINY_SDXL_UNET_CONFIG, dtype=torch.float32, operations=comfy.ops.disable_weight_init)


def detected_config_name(comfyui_path, sd) -> str:
    """ComfyUI's own detection on a diffusion-model state dict (tensors may be on 'meta')."""
    _import_comfy(comfyui_path)
    import comfy.model_detection
    cfg = comfy.model_detection.model_config_from_unet(sd, "")
    return type(cfg).__name__ if cfg is not None else "None"


def make_tiny_sdxl_unet(path, seed=0, comfyui_path=None) -> dict:
    """Write a tiny seeded SDXL UNet (diffusion_models format, fp32) that UNETLoader loads as SDXL."""
    import torch
    from safetensors.torch import save_file

    comfyui_path = comfyui_path or os.environ.get("COMFYUI_PATH")
    t0 = time.perf_counter()
    meta = tiny_sdxl_unet(comfyui_path).state_dict()
    detected = detected_config_name(comfyui_path, {k: torch.empty(v.shape, device="meta") for k, v in meta.items()})
    if detected != "SDXL":
        raise RuntimeError(f"tiny SDXL UNet is detected as {detected}, not SDXL")
    sd = _seeded_state_dict(tiny_sdxl_unet(comfyui_path), seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(sd, str(tmp), metadata={"format": "pt", "lora_lab_test": "tiny-sdxl-unet", "seed": str(seed)})
    os.replace(tmp, path)
    return {"path": str(path), "detected": detected, "seed": int(seed), "params": {"unet": sum(t.numel() for t in sd.values())},
            "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t0, 2)}


def flux_state_dict(seed=0, config=None, comfyui_path=None):
    """Seeded weights for a Flux of `config` (default TINY_FLUX_CONFIG), from ComfyUI's Flux class."""
    import torch
    if "comfy.model_management" not in sys.modules:  # not inside a running ComfyUI: import it for CPU
        _import_comfy(comfyui_path or os.environ.get("COMFYUI_PATH"))
    import comfy.ops
    import comfy.ldm.flux.model
    config = dict(config or TINY_FLUX_CONFIG)
    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(**config, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    sd = _seeded_state_dict(model, seed)
    for k in sd:  # modulation / norm scales as real checkpoints have them: RMSNorm scale 1
        if k.endswith(".scale"):
            sd[k] = torch.ones_like(sd[k])
    return sd


def load_tiny_flux(seed=0, config=None, dtype=None):
    """A Flux ModelPatcher built in-process exactly as comfy.sd.load_diffusion_model_state_dict
    builds one, but from `config` instead of the detected (3072-wide) one."""
    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    config = dict(config or TINY_FLUX_CONFIG)
    sd = flux_state_dict(seed, config)
    model_config = comfy.supported_models.Flux(config)
    unet_dtype = dtype or torch.float32
    model_config.set_inference_dtype(unet_dtype, None)
    model = model_config.get_model(sd, "")
    model = model.to(comfy.model_management.unet_offload_device())
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


# ---------------------------------------------------------------- stand-in text encoder and VAE
# Real SDXL (CLIP-L + 32-layer CLIP-G) and Flux (CLIP-L + T5-XXL) text encoders are gigabytes and
# cannot be shrunk (ComfyUI fixes their configs). These stand-ins give conditioning of the real
# shapes, a deterministic function of the caption's words, and a linear 8x "VAE" with the family's
# latent channels; they implement the parts of ComfyUI's CLIP / VAE objects the workflow uses.


def _word_vector(word, dim, salt):
    import hashlib
    import torch
    seed = int.from_bytes(hashlib.sha256(f"{salt}:{dim}:{word}".encode()).digest()[:8], "big") >> 1
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


class TinyTextEncoder:
    """Stands in for ComfyUI's CLIP object: tokenize / encode_from_tokens_scheduled / cond_stage_model."""

    def __init__(self, family):
        import torch
        self.family = family
        self.tokens, self.width, self.pooled_width, _ = ENCODER_DIMS[family]
        self.cond_stage_model = torch.nn.Module()
        self.cond_stage_model.register_buffer("dims", torch.tensor([self.tokens, self.width, self.pooled_width, hash(family) % 997]))

    def tokenize(self, text, **kw):
        return [w for w in str(text).lower().replace(",", " ").split() if w]

    def encode_from_tokens_scheduled(self, tokens, **kw):
        import torch
        words = list(tokens)[: self.tokens]
        rows = [_word_vector(w, self.width, "cross") for w in words]
        rows += [_word_vector("<pad>", self.width, "cross") * 0.1] * (self.tokens - len(rows))
        cross = torch.stack(rows)[None]
        pooled = (torch.stack([_word_vector(w, self.pooled_width, "pooled") for w in words]).mean(0) if words
                  else torch.zeros(self.pooled_width))[None]
        return [[cross, {"pooled_output": pooled}]]


class TinyVAE:
    """Stands in for ComfyUI's VAE: 8x average pooling and a fixed linear map to the family's
    latent channels, scaled so the model sees unit-scale latents after process_latent_in."""

    def __init__(self, family, seed=0):
        import torch
        self.family = family
        channels = ENCODER_DIMS[family][3]
        g = torch.Generator().manual_seed(1000 + int(seed))
        m = torch.randn(channels, 3, generator=g)
        self.first_stage_model = torch.nn.Module()
        self.first_stage_model.register_buffer("proj", m)
        self.first_stage_model.register_buffer("unproj", torch.linalg.pinv(m))
        self.scale, self.shift = (0.13025, 0.0) if family == "sdxl" else (0.3611, 0.1159)
        self.downscale_ratio = 8
        self.latent_channels = channels

    def encode(self, pixels):
        import torch
        x = pixels[..., :3].movedim(-1, 1).float() * 2 - 1
        x = torch.nn.functional.avg_pool2d(x, 8)
        z = torch.einsum("ck,bkhw->bchw", self.first_stage_model.proj, x) * 2
        return z / self.scale + self.shift

    def decode(self, latent):
        import torch
        z = (latent.float() - self.shift) * self.scale / 2
        x = torch.einsum("kc,bchw->bkhw", self.first_stage_model.unproj, z)
        x = torch.nn.functional.interpolate(x, scale_factor=8, mode="nearest")
        return ((x + 1) / 2).clamp(0, 1).movedim(1, -1)


class LoRALabTestEncoders:
    """Test-only node: the stand-in CLIP and VAE of a family."""
    CATEGORY = "LoRA Lab tests"
    RETURN_TYPES = ("CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["sdxl", "flux"],)}}

    def load(self, family):
        return TinyTextEncoder(family), TinyVAE(family)


# A real ComfyUI SDXL text encoder (SDXLClipModel: CLIP-L + CLIP-G, ComfyUI's tokenizer and LoRA
# key map) at the real widths, with 3 encoder layers each instead of 12 / 32 (ComfyUI's per-encoder
# config override), for training the text-encoder LoRA. Seeded random weights.
SDXL_CLIP_LAYERS = 3


def tiny_sdxl_clip(seed=0):
    import torch
    import comfy.sd
    import comfy.sdxl_clip

    class Target:
        params = {}
        clip = comfy.sdxl_clip.SDXLClipModel
        tokenizer = comfy.sdxl_clip.SDXLTokenizer

    layers = {"num_hidden_layers": SDXL_CLIP_LAYERS}
    options = {"clip_l_model_config": layers, "clip_g_model_config": layers, "dtype": torch.float32}
    clip = comfy.sd.CLIP(Target(), model_options=options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(clip.cond_stage_model.named_parameters()):
            if "layer_norm" in name or "final_layer_norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return clip


class LoRALabTestSDXLClip:
    """Test-only node: a real ComfyUI SDXL CLIP with few layers (see tiny_sdxl_clip)."""
    CATEGORY = "LoRA Lab tests"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def load(self, seed):
        return (tiny_sdxl_clip(seed),)


class LoRALabTestTinyFlux:
    """Test-only node: the narrow seeded Flux MODEL (see TINY_FLUX_CONFIG)."""
    CATEGORY = "LoRA Lab tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def load(self, seed):
        return (load_tiny_flux(seed),)


class LoRALabTestDatasetInfo:
    """Test-only node: each example's name and size/crop conditioning, as JSON text."""
    CATEGORY = "LoRA Lab tests"
    RETURN_TYPES = ()
    FUNCTION = "info"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dataset": ("LORALAB_DATASET",)}}

    def info(self, dataset):
        rows = [{"name": ex.name, "latent": list(ex.latents[0].shape), "extra": [dict(c.get("extra", {})) for c in ex.conds]}
                for ex in dataset.examples]
        return {"ui": {"text": [json.dumps(rows)]}, "result": ()}


TEST_NODE_CLASS_MAPPINGS = {"LoRALabTestEncoders": LoRALabTestEncoders, "LoRALabTestTinyFlux": LoRALabTestTinyFlux, "LoRALabTestSDXLClip": LoRALabTestSDXLClip,
                            "LoRALabTestDatasetInfo": LoRALabTestDatasetInfo}


def install_test_nodes(custom_nodes_dir, name="lora_lab_test_nodes"):
    """Writes a custom-node pack that registers TEST_NODE_CLASS_MAPPINGS from this file."""
    d = Path(custom_nodes_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    here = str(Path(__file__).resolve().parent)
    (d / "__init__.py").write_text(
        "import sys\n"
        f"sys.path.append({here!r})  # last: nothing of ComfyUI's is shadowed\n"
        "import tiny_models as _m, tiny_families as _f\n"
        "NODE_CLASS_MAPPINGS = {**_m.TEST_NODE_CLASS_MAPPINGS, **_f.TEST_NODE_CLASS_MAPPINGS}\n",
        encoding="utf-8")
    return d


def _param_count_str(counts):
    return ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a tiny seeded SD1.5 checkpoint (needs COMFYUI_PATH or --comfyui).")
    ap.add_argument("out", help="output .safetensors path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: $COMFYUI_PATH)")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--dataset", default=None, help="also write an 8-image dataset into this folder")
    ap.add_argument("--family", choices=["sd15", "sdxl"], default="sd15",
                    help="sd15: full checkpoint; sdxl: a UNet-only file for models/diffusion_models")
    a = ap.parse_args(argv)
    if a.family == "sdxl":
        info = make_tiny_sdxl_unet(a.out, seed=a.seed, comfyui_path=a.comfyui)
    else:
        info = make_tiny_sd15_checkpoint(a.out, seed=a.seed, comfyui_path=a.comfyui, dtype=a.dtype)
    if a.dataset:
        make_dataset(a.dataset, seed=a.seed)
    print(json.dumps(info))
    print(f"# params: {_param_count_str(info['params'])}; file {info['bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
