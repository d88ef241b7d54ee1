"""Tiny seeded models of the families beyond SD1.5 / SDXL / Flux, built from ComfyUI's own classes.

Each family is built in-process the way comfy.sd.load_diffusion_model_state_dict builds a model
(`comfy.supported_models.<Config>(unet_config)` -> `get_model` -> `load_model_weights`), from a narrow
config instead of the one ComfyUI's detection would read from a full-size file: detection pins the
widths of Chroma, Qwen-Image, AuraFlow and Lumina 2 (3072 / 2304 ...), so a narrow model cannot come
from a file. The text encoders of these families (T5-XXL, Qwen2.5-VL 7B, Gemma 2) are gigabytes: the
stand-in encoder gives conditioning of the real widths (and Lumina 2's attention mask), the stand-in
VAE latents of the family's channel count (5-D for Qwen-Image, whose VAE is Wan's).

SD2.x 768-v: ComfyUI decides v-prediction from the weights of the last output block of a real
checkpoint (`SD20.model_type`), which a one-level UNet does not have; the tiny SD2 is built as
`model_base.BaseModel(SD20 config, ModelType.V_PREDICTION)`, which is what that check returns for a
768-v file. Its model_sampling is ComfyUI's V_PREDICTION.
"""

from __future__ import annotations

import torch

from tiny_models import TINY_UNET_CONFIG, TinyTextEncoder, TinyVAE, _seeded_state_dict, _word_vector

# family -> (supported_models config class, unet config, text tokens, text width, pooled width or None,
#            latent channels, latent dims, VAE scale, VAE shift)
FAMILIES = {
    "sd2v": ("SD20", dict(TINY_UNET_CONFIG, context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64),
             77, 1024, None, 4, 4, 0.18215, 0.0),
    "sd3": ("SD3", {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
                    "adm_in_channels": 2048, "pos_embed_max_size": 16, "num_patches": 256, "qk_norm": "rms",
                    "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [0],
                    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}}},
            32, 4096, 2048, 16, 4, 1.5305, 0.0609),
    "chroma": ("Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096, "hidden_size": 128,
                          "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 28, 28],
                          "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 128, "hidden_dim": 256, "n_layers": 2},
               32, 4096, None, 16, 4, 0.3611, 0.1159),
    "qwen_image": ("QwenImage", {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
                                 "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 3584,
                                 "axes_dims_rope": (8, 12, 12)},
                   32, 3584, None, 16, 5, 1.0, 0.0),
    # Wan: latents [B, C, T, H, W] (images are 1-frame clips); umT5 text width 4096.
    "wan21": ("WAN21_T2V", {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 64, "ffn_dim": 128,
                            "freq_dim": 32, "text_dim": 4096, "out_dim": 16, "num_heads": 2, "num_layers": 2},
              32, 4096, None, 16, 5, 1.0, 0.0),
    "wan22_5b": ("WAN22_T2V", {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 48, "dim": 64, "ffn_dim": 128,
                               "freq_dim": 32, "text_dim": 4096, "out_dim": 48, "num_heads": 2, "num_layers": 2},
                 32, 4096, None, 48, 5, 1.0, 0.0),
    # No LoRA Lab profile: trained by the generic path.
    "auraflow": ("AuraFlow", {"cond_seq_dim": 2048, "in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 128, "n_layers": 4,
                              "n_double_layers": 2, "n_heads": 2, "global_conddim": 128, "max_seq": 256},
                 32, 2048, None, 4, 4, 0.13025, 0.0),
    # v-prediction through the generic path: two text encoders (BERT 77 x 1024 as cross_attn, mT5
    # 256 x 2048 as conditioning_mt5xl) with their attention masks, all carried by the dataset cache.
    "hunyuan_dit": ("HunyuanDiT", {"image_model": "hydit", "input_size": [8, 8], "patch_size": 2, "in_channels": 4, "hidden_size": 64,
                                   "depth": 2, "num_heads": 2, "text_states_dim": 1024, "text_states_dim_t5": 2048, "text_len": 77,
                                   "text_len_t5": 256, "learn_sigma": True, "size_cond": False, "use_style_cond": False},
                    77, 1024, None, 4, 4, 0.13025, 0.0),
    "lumina2": ("Lumina2", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 128, "n_layers": 2,
                            "n_refiner_layers": 2, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 32, "qk_norm": True,
                            "cap_feat_dim": 2304, "axes_dims": [16, 24, 24], "axes_lens": [300, 512, 512]},
                32, 2304, None, 16, 4, 0.3611, 0.1159),
}


GATES = ("mod.", "modC", "modX", "modF", "adaLN_modulation", "img_mod", "txt_mod", "time_projection")


def load_tiny_family(family: str, seed: int = 0):
    """A ModelPatcher of the tiny `family` model, seeded, in float32."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config_name, unet_config = FAMILIES[family][:2]
    model_config = getattr(comfy.supported_models, config_name)(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    if family == "sd2v":
        model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    else:
        model = model_config.get_model({}, "")
    sd = _seeded_state_dict(model.diffusion_model, seed)
    for k in sd:  # RMSNorm / modulation scales as real checkpoints have them
        if k.endswith(".scale"):
            sd[k] = torch.ones_like(sd[k])
        # Modulation layers set the blocks' gates: at the 0.02 std of the other weights every block's
        # output would be gated to ~0 (nothing for a LoRA to change); trained models have open gates.
        elif k.endswith(".weight") and sd[k].ndim == 2 and any(m in k for m in GATES):
            sd[k] = sd[k] * 25
    model = model.to(comfy.model_management.unet_offload_device())
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


class FamilyTextEncoder(TinyTextEncoder):
    """The stand-in CLIP with the family's text width (no pooled output where the family has none;
    Lumina 2's Gemma gives an attention mask, 1 on the caption's tokens)."""

    def __init__(self, family):
        _, _, self.tokens, self.width, pooled, *_ = FAMILIES[family]
        self.family, self.pooled_width = family, pooled or 8
        self.has_pooled = pooled is not None
        self.cond_stage_model = torch.nn.Module()
        self.cond_stage_model.register_buffer("dims", torch.tensor([self.tokens, self.width, self.pooled_width, sum(map(ord, family))]))

    def encode_from_tokens_scheduled(self, tokens, **kw):
        (cross, extras), = super().encode_from_tokens_scheduled(tokens, **kw)
        extras = dict(extras) if self.has_pooled else {}
        n = max(1, min(len(list(tokens)), self.tokens))
        if self.family in ("lumina2", "hunyuan_dit"):
            extras["attention_mask"] = (torch.arange(self.tokens) < n).long()[None]
        if self.family == "hunyuan_dit":  # HunyuanDiT's second encoder, mT5-XL
            rows = [_word_vector(w, 2048, "mt5") for w in list(tokens)[:256]]
            rows += [torch.zeros(2048)] * (256 - len(rows))
            extras["conditioning_mt5xl"] = torch.stack(rows)[None]
            extras["attention_mask_mt5xl"] = (torch.arange(256) < n).long()[None]
        return [[cross, extras]]


class FamilyVAE(TinyVAE):
    """The stand-in VAE with the family's latent channels (and time axis for Qwen-Image's Wan VAE)."""

    def __init__(self, family, seed=0):
        *_, channels, dims, scale, shift = FAMILIES[family]
        g = torch.Generator().manual_seed(1000 + int(seed))
        m = torch.randn(channels, 3, generator=g)
        self.family, self.dims = family, dims
        self.first_stage_model = torch.nn.Module()
        self.first_stage_model.register_buffer("proj", m)
        self.first_stage_model.register_buffer("unproj", torch.linalg.pinv(m))
        self.scale, self.shift = scale, shift
        self.downscale_ratio = 8
        self.latent_channels = channels

    def encode(self, pixels):
        z = super().encode(pixels)
        return z[:, :, None] if self.dims == 5 else z

    def decode(self, latent):
        """Images [B, H, W, 3]; a 5-D latent gives frames [B, T, H, W, 3], as ComfyUI's video VAEs do
        (this stand-in does not expand time)."""
        if latent.ndim == 5:
            return torch.stack([super(FamilyVAE, self).decode(latent[:, :, t]) for t in range(latent.shape[2])], dim=1)
        return super().decode(latent)


class LoRALabTestTinyFamily:
    """Test-only node: the tiny seeded MODEL of a family (see FAMILIES)."""
    CATEGORY = "LoRA Lab tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILIES),), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def load(self, family, seed):
        return (load_tiny_family(family, seed),)


class LoRALabTestFamilyEncoders:
    """Test-only node: the stand-in CLIP and VAE of a family (see FAMILIES)."""
    CATEGORY = "LoRA Lab tests"
    RETURN_TYPES = ("CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILIES),)}}

    def load(self, family):
        return FamilyTextEncoder(family), FamilyVAE(family)


TEST_NODE_CLASS_MAPPINGS = {"LoRALabTestTinyFamily": LoRALabTestTinyFamily, "LoRALabTestFamilyEncoders": LoRALabTestFamilyEncoders}


def wan_vae(seed: int = 0):
    """ComfyUI's own Wan 2.1 VAE (comfy.sd.VAE detects it from the weights: the real 96-wide config,
    4x temporal and 8x spatial compression), with seeded random weights."""
    import comfy.ldm.wan.vae
    import comfy.sd

    with torch.device("meta"):
        shapes = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                          temperal_downsample=[False, True, True], dropout=0.0)
    sd = _seeded_state_dict(shapes, seed)
    for k in sd:
        if k.endswith(".gamma"):  # RMS norm scales
            sd[k] = torch.ones_like(sd[k])
    return comfy.sd.VAE(sd=sd)
