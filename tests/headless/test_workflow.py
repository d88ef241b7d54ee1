"""The headless graphs of every profiled family (headless/workflow.py) and the family read from a file (headless/cli.py)."""

import pytest
import torch
from safetensors.torch import save_file

from headless.cli import family_of, model_folders
from headless.workflow import CKPT, CLIP_LOADER, FAMILIES, FAMILY_DEFAULTS, GUIDANCE, LATENT, NEG, TRAIN, VAE_LOADER, TrainingOptions, training_prompt
from trainer.profiles import profile_for


def prompt(family, **kw):
    return training_prompt(TrainingOptions(checkpoint="model.safetensors", dataset="d", family=family, **kw))


def classes(p):
    return {k: n["class_type"] for k, n in p.items()}


def test_every_profiled_family_has_a_workflow():
    assert set(FAMILIES) == {"sd15", "sd2", "sdxl", "sd3", "chroma", "flux", "qwen_image", "wan"}


@pytest.mark.parametrize("family, loaders", [
    ("sd15", ["CheckpointLoaderSimple"]),
    ("sdxl", ["CheckpointLoaderSimple"]),
    ("sd3", ["CheckpointLoaderSimple", "TripleCLIPLoader"]),
    ("flux", ["UNETLoader", "DualCLIPLoader", "VAELoader"]),
    ("chroma", ["UNETLoader", "CLIPLoader", "VAELoader"]),
    ("qwen_image", ["UNETLoader", "CLIPLoader", "VAELoader"]),
])
def test_loaders_come_from_the_profile(family, loaders):
    p = prompt(family)
    assert [p[k]["class_type"] for k in (CKPT, CLIP_LOADER, VAE_LOADER) if k in p] == loaders
    dataset = next(n for n in p.values() if n["class_type"] == "LoRALabDataset")["inputs"]
    assert dataset["clip"][0] == (CLIP_LOADER if CLIP_LOADER in p else CKPT)
    assert dataset["vae"][0] == (VAE_LOADER if VAE_LOADER in p else CKPT)


def test_qwen_image_graph():
    p = prompt("qwen_image")
    assert p[CLIP_LOADER]["inputs"] == {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image", "device": "default"}
    assert p[VAE_LOADER]["inputs"] == {"vae_name": "qwen_image_vae.safetensors"}
    assert p[LATENT]["class_type"] == "EmptySD3LatentImage" and p[NEG]["class_type"] == "CLIPTextEncode"
    train = p[TRAIN]["inputs"]
    assert train["timestep_sampling"] == "shift" and "guidance" not in train  # Qwen-Image takes no guidance
    assert GUIDANCE not in p


def test_wan_graph_trains_and_tests_clips():
    p = prompt("wan")
    assert p[CLIP_LOADER]["inputs"] == {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"}
    dataset = next(n for n in p.values() if n["class_type"] == "LoRALabDataset")["inputs"]
    assert (dataset["frames"], dataset["fps"], dataset["resolution"]) == (17, 16.0, 512)
    assert p[LATENT] == {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"batch_size": 1, "width": 512, "height": 512, "length": 17}}
    image_family = next(n for n in prompt("sd15").values() if n["class_type"] == "LoRALabDataset")["inputs"]
    assert "frames" not in image_family  # image families keep the node's default (images only)


def test_sd3_takes_three_text_encoders_in_order():
    p = prompt("sd3", clip_l="l.safetensors", clip_g="g.safetensors", t5xxl="t5.safetensors")
    assert p[CLIP_LOADER]["inputs"] == {"clip_name1": "l.safetensors", "clip_name2": "g.safetensors", "clip_name3": "t5.safetensors"}


def test_only_flux_is_trained_and_sampled_with_guidance():
    for family in FAMILIES:
        p = prompt(family)
        assert ("guidance" in p[TRAIN]["inputs"]) == (GUIDANCE in p) == (family == "flux"), family
        assert (p[NEG]["class_type"] == "ConditioningZeroOut") == (family == "flux"), family


def test_family_defaults_are_the_profiles():
    for family in FAMILIES:
        d, w = profile_for(family).defaults, profile_for(family).workflow
        o = TrainingOptions(checkpoint="m", dataset="d", family=family)
        assert (o.resolution, o.timestep_sampling, o.save_dtype, o.fp8_base, o.test_cfg) == (d.resolution, d.timestep_sampling, d.save_dtype, d.fp8_base, w.test_cfg)
        assert FAMILY_DEFAULTS[family]["vae"] == (w.vae_file or None)


@pytest.mark.parametrize("family, keys", [
    ("sd15", ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.0.in_layers.0.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"]),
    ("sd2", ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]),
    ("sdxl", ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.0.x", "model.diffusion_model.label_emb.0.0.weight"]),
    ("sdxl", ["input_blocks.0.0.weight", "middle_block.1.proj_in.weight", "label_emb.0.0.weight"]),  # a UNet-only file
    ("sd3", ["model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"]),
    ("flux", ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"]),
    ("chroma", ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "distilled_guidance_layer.in_proj.weight"]),
    ("qwen_image", ["txt_norm.weight", "transformer_blocks.0.img_mod.1.weight"]),
    ("wan", ["head.modulation", "blocks.0.self_attn.q.weight", "patch_embedding.weight"]),
])
def test_family_is_read_from_the_files_tensor_names(tmp_path, family, keys):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    assert family_of(str(path), None) == family


def test_an_unknown_or_missing_file_asks_for_family(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"something.weight": torch.zeros(1)}, str(path))
    with pytest.raises(SystemExit, match="--family"):
        family_of(str(path), None)
    with pytest.raises(SystemExit, match="is not a file"):
        family_of(str(tmp_path / "missing.safetensors"), None)
    (tmp_path / "notes.safetensors").write_text("not a model")
    with pytest.raises(SystemExit, match="could not be read"):
        family_of(str(tmp_path / "notes.safetensors"), None)


def test_model_files_go_to_the_families_folders():
    assert model_folders("qwen_image") == {"checkpoint": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae"}
    assert model_folders("sd15") == {"checkpoint": "checkpoints"}
    assert model_folders("sd3") == {"checkpoint": "checkpoints", "clip_l": "text_encoders", "clip_g": "text_encoders", "t5xxl": "text_encoders"}
