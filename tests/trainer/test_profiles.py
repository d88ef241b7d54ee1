"""Family detection and the generic path, on stand-ins named like ComfyUI's model_base classes."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.profiles import PROFILES, describe, detect, generic_profile, profile_for, repeated_blocks


class BaseModel(nn.Module):
    def __init__(self, **unet_config):
        super().__init__()
        self.model_config = SimpleNamespace(unet_config=unet_config)
        self.diffusion_model = nn.Module()


class SDXL(BaseModel): pass
class SDXL_instructpix2pix(SDXL): pass
class Flux(BaseModel): pass
class Chroma(Flux): pass
class ChromaRadiance(Chroma): pass
class SD3(BaseModel): pass
class QwenImage(BaseModel): pass
class ACEStep(BaseModel): pass
class Hunyuan3Dv2(BaseModel): pass
class WAN21(BaseModel): pass
class WAN22(WAN21): pass
class WAN21_Vace(WAN21): pass


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class Lumina2(BaseModel):
    def __init__(self):
        super().__init__()
        dm = self.diffusion_model
        dm.noise_refiner = nn.ModuleList([Block(), Block()])
        dm.layers = nn.ModuleList([Block() for _ in range(4)])
        dm.mixed = nn.ModuleList([Block(), Other()])  # not one class: not repeated blocks
        dm.norms = nn.ModuleList([nn.LayerNorm(4), nn.LayerNorm(4)])  # no Linear inside
        dm.layers[0].inner = nn.ModuleList([Other(), Other()])  # nested in a repeated list: not listed


@pytest.mark.parametrize("model, key", [
    (BaseModel(context_dim=768), "sd15"),
    (BaseModel(context_dim=1024), "sd2"),
    (SDXL(), "sdxl"),
    (SDXL_instructpix2pix(), "sdxl"),
    (Flux(), "flux"),
    (Chroma(), "chroma"),  # a Flux subclass in ComfyUI, not Flux
    (ChromaRadiance(), "chroma"),
    (SD3(), "sd3"),
    (QwenImage(), "qwen_image"),
    (WAN21(model_type="t2v"), "wan"),
    (WAN22(model_type="t2v", out_dim=48), "wan"),
])
def test_detect_walks_the_class_hierarchy_most_specific_first(model, key):
    assert detect(model).key == key


def test_a_bare_base_model_of_another_width_is_generic_not_sd15():
    model = BaseModel(context_dim=512)
    model.diffusion_model.blocks = nn.ModuleList([Block(), Block()])
    assert detect(model).generic


@pytest.mark.parametrize("model, words", [(ACEStep(), "audio"), (Hunyuan3Dv2(), "3D"), (WAN21(model_type="i2v"), "video"), (WAN21_Vace(model_type="t2v"), "video")])
def test_audio_3d_and_video_models_are_refused_naming_the_model(model, words):
    with pytest.raises(ConfigError) as e:
        detect(model)
    assert e.value.field == "model" and words in e.value.message and type(model).__name__ in e.value.message


def test_repeated_blocks_are_the_outermost_lists_of_one_block_class_with_linears():
    model = Lumina2()
    assert [p for p, _ in repeated_blocks(model.diffusion_model)] == ["noise_refiner", "layers"]
    profile = detect(model)
    assert profile.generic and profile.containers == ("Block",)
    assert profile.checkpoint_blocks == ("noise_refiner", "layers")
    assert profile.inplace_blocks == ("Block",)  # unknown blocks are treated as updating in place
    assert profile.label == "Lumina2" and "no LoRA Lab profile" in describe(profile, 12)
    assert "12 Linear layers" in describe(profile, 12)


def test_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(ConfigError, match="no repeated transformer blocks"):
        generic_profile(BaseModel(context_dim=1))


class V_PREDICTION: pass
class EPS: pass


@pytest.mark.parametrize("sampling, version, arch", [(V_PREDICTION, "sd_v2_v", "stable-diffusion-v2-768-v"), (EPS, "sd_v2", "stable-diffusion-v2-512")])
def test_sd2_metadata_follows_the_prediction_type(sampling, version, arch):
    model = BaseModel(context_dim=1024)
    model.model_sampling = sampling()
    assert detect(model).metadata[:2] == (version, arch)


@pytest.mark.parametrize("config, version, label", [({"depth": 38}, "5-large", "SD3.5"), ({"depth": 24, "x_block_self_attn_layers": [0, 1]}, "5-medium", "SD3.5"), ({"depth": 24}, "medium", "SD3")])
def test_sd3_metadata_names_the_variant_as_sd_scripts_does(config, version, label):
    profile = detect(SD3(**config))
    assert profile.metadata[0] == version and profile.label == label


def test_wan_labels_say_which_wan():
    assert detect(WAN22(model_type="t2v", out_dim=48)).label == "Wan 2.2 5B"
    assert detect(WAN21(model_type="t2v", out_dim=16)).label == "Wan 2.1/2.2 T2V"


def test_profiles_have_unique_keys():
    assert len({p.key for p in PROFILES}) == len(PROFILES)
    assert profile_for("flux").guidance and not profile_for("chroma").guidance
    with pytest.raises(ConfigError, match="unknown family"):
        profile_for("sd4")
