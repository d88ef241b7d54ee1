import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import trainer.io as lora_io
from trainer.network import NetworkConfig
from trainer.errors import ConfigError, LoRALabError
from trainer.io import (
    build_metadata,
    check_compatible,
    load_lora,
    lora_modules,
    save_lora,
    weights_hash,
)

ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def make_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f"{ATTN}.lora_down.weight": torch.randn(4, 32, generator=g),
        f"{ATTN}.lora_up.weight": torch.randn(32, 4, generator=g),
        f"{ATTN}.alpha": torch.tensor(2.0),
        f"{CONV}.lora_down.weight": torch.randn(2, 8, 3, 3, generator=g),
        f"{CONV}.lora_up.weight": torch.randn(16, 2, 1, 1, generator=g),
        f"{CONV}.alpha": torch.tensor([1.0]),  # [1] is accepted and written 0-dim
        f"{TE}.lora_down.weight": torch.randn(4, 24, generator=g),
        f"{TE}.lora_up.weight": torch.randn(24, 4, generator=g),
        f"{TE}.alpha": torch.tensor(0.3),
    }


def meta(**overrides):
    args = dict(
        base_model="sd15", output_name="my_lora", network=NetworkConfig(rank=4, alpha=2.0), learning_rate=1e-4,
        text_encoder_lr=5e-5, steps=100, epochs=3, started_at=1_700_000_000.5,
        optimizer="AdamW", scheduler="cosine",
    )
    args.update(overrides)
    return build_metadata(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(tmp_path, dtype):
    weights = make_weights()
    path = tmp_path / "out.safetensors"
    metadata = meta()
    save_lora(path, weights, metadata, dtype=dtype)

    loaded, loaded_meta = load_lora(path)
    assert set(loaded) == set(weights)
    for key, original in weights.items():
        if key.endswith(".alpha"):
            assert loaded[key].shape == torch.Size([])
            assert loaded[key].dtype == torch.float32
            assert loaded[key].item() == pytest.approx(original.item())
        else:
            assert loaded[key].shape == original.shape
            assert loaded[key].dtype == dtype
            torch.testing.assert_close(loaded[key], original.to(dtype))
    for key, value in metadata.items():
        if key != "sshs_model_hash":
            assert loaded_meta[key] == value
    # the stored hash describes the tensors as written
    assert loaded_meta["sshs_model_hash"] == weights_hash(loaded)
    # alpha is stored 0-dim in the file itself, not only after load
    with safe_open(str(path), framework="pt") as f:
        assert f.get_slice(f"{CONV}.alpha").get_shape() == []


def test_save_keeps_stored_dtype_when_dtype_is_none(tmp_path):
    weights = {k: v.to(torch.float16) if not k.endswith("alpha") else v for k, v in make_weights().items()}
    path = tmp_path / "a.safetensors"
    save_lora(path, weights, {})
    loaded, _ = load_lora(path)
    assert loaded[f"{ATTN}.lora_up.weight"].dtype == torch.float16


def test_lora_modules_reports_rank_and_alpha():
    assert lora_modules(make_weights()) == {
        ATTN: (4, 2.0),
        CONV: (2, 1.0),
        TE: (4, pytest.approx(0.3)),
    }


def test_atomic_write_keeps_previous_file_when_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_lora(path, make_weights(seed=1), meta())
    before = path.read_bytes()

    def failing_write(fileobj, data):
        fileobj.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora_io, "_write_all", failing_write)
    with pytest.raises(LoRALabError, match="No space left"):
        save_lora(path, make_weights(seed=2), meta())

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_atomic_write_cleans_up_on_interrupt_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "new.safetensors"

    def interrupted(fileobj, data):
        fileobj.write(data[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_io, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_lora(path, make_weights(), meta())
    assert not path.exists()
    assert os.listdir(tmp_path / "sub") == []


def test_refuses_nan_naming_the_module(tmp_path):
    weights = make_weights()
    weights[f"{TE}.lora_up.weight"][0, 0] = float("nan")
    path = tmp_path / "x.safetensors"
    with pytest.raises(LoRALabError, match=TE):
        save_lora(path, weights, {})
    assert not path.exists()


def test_refuses_fp16_overflow(tmp_path):
    weights = make_weights()
    weights[f"{ATTN}.lora_down.weight"][0, 0] = 1e6
    with pytest.raises(LoRALabError, match="fp32|bf16"):
        save_lora(tmp_path / "x.safetensors", weights, {}, dtype=torch.float16)
    save_lora(tmp_path / "y.safetensors", weights, {}, dtype=torch.bfloat16)


@pytest.mark.parametrize("drop", ["lora_up.weight", "lora_down.weight"])
def test_refuses_module_missing_one_half(tmp_path, drop):
    weights = make_weights()
    del weights[f"{CONV}.{drop}"]
    with pytest.raises(LoRALabError, match=CONV):
        save_lora(tmp_path / "x.safetensors", weights, {})


def test_refuses_missing_alpha_on_save(tmp_path):
    weights = make_weights()
    del weights[f"{ATTN}.alpha"]
    with pytest.raises(LoRALabError, match=f"{ATTN}.*alpha"):
        save_lora(tmp_path / "x.safetensors", weights, {})


def test_refuses_rank_mismatch(tmp_path):
    weights = make_weights()
    weights[f"{ATTN}.lora_up.weight"] = torch.randn(32, 3)
    with pytest.raises(LoRALabError, match=ATTN):
        save_lora(tmp_path / "x.safetensors", weights, {})


def test_refuses_non_safetensors_paths(tmp_path):
    with pytest.raises(LoRALabError, match=r"\.safetensors"):
        save_lora(tmp_path / "x.ckpt", make_weights(), {})
    bogus = tmp_path / "x.pt"
    bogus.write_bytes(b"not a pickle, but never opened anyway")
    with pytest.raises(LoRALabError, match=r"\.safetensors"):
        load_lora(bogus)


def test_load_reports_missing_and_damaged_files(tmp_path):
    with pytest.raises(LoRALabError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(LoRALabError, match="not a readable safetensors"):
        load_lora(damaged)


def test_load_fills_missing_alpha_with_rank(tmp_path):
    weights = {k: v for k, v in make_weights().items() if not k.endswith(".alpha")}
    path = tmp_path / "noalpha.safetensors"
    save_file(weights, str(path))
    loaded, metadata = load_lora(path)
    assert metadata == {}
    assert loaded[f"{ATTN}.alpha"].item() == 4.0
    assert loaded[f"{CONV}.alpha"].item() == 2.0
    assert loaded[f"{ATTN}.alpha"].shape == torch.Size([])


def test_load_refuses_lone_half_and_foreign_keys(tmp_path):
    weights = make_weights()
    del weights[f"{TE}.lora_down.weight"]
    path = tmp_path / "half.safetensors"
    save_file(weights, str(path))
    with pytest.raises(LoRALabError, match=TE):
        load_lora(path)

    lone = tmp_path / "loha.safetensors"
    save_file({f"{ATTN}.hada_w1_a": torch.zeros(4, 4)}, str(lone))
    with pytest.raises(LoRALabError, match="hada_w1_a but no hada_w1_b"):
        load_lora(lone)

    foreign = tmp_path / "oft.safetensors"
    save_file({f"{ATTN}.oft_blocks": torch.zeros(4, 4)}, str(foreign))
    with pytest.raises(LoRALabError, match="not kohya / LyCORIS LoRA weights"):
        load_lora(foreign)


def test_metadata_has_required_keys_as_strings():
    m = meta(network=NetworkConfig(rank=4, alpha=2.0, conv_rank=8, conv_alpha=4))
    required = [
        "ss_base_model_version", "ss_output_name", "ss_network_dim", "ss_network_alpha",
        "ss_network_module", "ss_network_args", "ss_learning_rate", "ss_unet_lr",
        "ss_text_encoder_lr", "ss_steps", "ss_epoch", "ss_training_started_at", "ss_optimizer",
        "ss_lr_scheduler", "modelspec.sai_model_spec", "modelspec.architecture",
        "modelspec.implementation", "modelspec.title", "modelspec.date",
    ]
    for key in required:
        assert isinstance(m[key], str), key
    assert all(isinstance(v, str) for v in m.values())
    assert m["ss_base_model_version"] == "sd_v1"
    assert m["ss_network_module"] == "networks.lora"
    assert m["ss_network_dim"] == "4"
    assert float(m["ss_network_alpha"]) == 2.0
    assert float(m["ss_learning_rate"]) == 1e-4
    assert float(m["ss_text_encoder_lr"]) == 5e-5
    assert m["ss_steps"] == "100" and m["ss_epoch"] == "3"
    assert float(m["ss_training_started_at"]) == 1_700_000_000.5
    assert m["modelspec.sai_model_spec"] == "1.0.0"
    assert m["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert m["modelspec.title"] == "my_lora"
    assert m["modelspec.date"].startswith("2023-11-14T22:13:20")
    args = json.loads(m["ss_network_args"])
    assert int(args["conv_dim"]) == 8 and float(args["conv_alpha"]) == 4.0
    assert json.loads(meta()["ss_network_args"]) == {}
    assert "sshs_model_hash" not in m


def test_metadata_per_family():
    sdxl = meta(base_model="sdxl")
    assert sdxl["ss_base_model_version"].startswith("sdxl_")
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    flux = meta(base_model="flux", text_encoder_lr=None, epochs=None)
    assert flux["ss_base_model_version"] == "flux1"
    assert flux["modelspec.architecture"] == "flux-1-dev/lora"
    assert flux["ss_text_encoder_lr"] == "None"
    sd3 = meta(base_model="sd3")
    assert sd3["ss_base_model_version"] == "5-large" and sd3["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"
    sd2 = meta(base_model="sd2")
    assert sd2["ss_base_model_version"] == "sd_v2" and sd2["ss_v2"] == "True"
    with pytest.raises(ConfigError, match="base_model"):
        meta(base_model="sd4")


def test_metadata_extras_and_hash():
    weights = make_weights()
    m = meta(extra={"version": "0.1.0", "lora_lab_seed": 42, "ss_resolution": (512, 512)}, weights=weights)
    assert m["lora_lab_version"] == "0.1.0"
    assert m["lora_lab_seed"] == "42"
    assert json.loads(m["ss_resolution"]) == [512, 512]
    assert m["sshs_model_hash"] == weights_hash(weights)


def test_weights_hash_is_deterministic_and_sensitive():
    a = make_weights()
    b = dict(reversed(list(make_weights().items())))  # same content, other insertion order
    assert weights_hash(a) == weights_hash(b)
    b[f"{ATTN}.lora_up.weight"] = b[f"{ATTN}.lora_up.weight"].clone()
    b[f"{ATTN}.lora_up.weight"][3, 1] += 1e-3
    assert weights_hash(a) != weights_hash(b)
    c = dict(a)
    c[f"{ATTN}.lora_up.weight"] = a[f"{ATTN}.lora_up.weight"].to(torch.float16)
    assert weights_hash(a) != weights_hash(c)


def test_save_refuses_non_string_metadata(tmp_path):
    with pytest.raises(LoRALabError, match="ss_steps"):
        save_lora(tmp_path / "x.safetensors", make_weights(), {"ss_steps": 100})


def test_check_compatible():
    weights = make_weights()
    sd15_names = {ATTN, CONV, TE, "lora_unet_mid_block_attentions_0_proj_in"}
    check_compatible(weights, sd15_names, "SD1.5")  # file covers a subset: fine

    sdxl_names = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
    }
    with pytest.raises(LoRALabError) as info:
        check_compatible(weights, sdxl_names, "SDXL")
    message = str(info.value)
    assert "0 of its 3 modules match" in message
    assert ATTN in message or CONV in message or TE in message
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in message
    assert "SD1.5" in message and "trained for SDXL" in message

    # partly matching: the file adapts layers the current targets do not include
    with pytest.raises(LoRALabError, match="2 of its 3 modules match") as info:
        check_compatible(weights, {ATTN, CONV}, "SD1.5")
    assert TE in str(info.value)


# --------------------------------------------------------------------------------------------
# kill -9 in the middle of a save

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Saves generation after generation to one path, as fast as it can. Every tensor of generation g
# is filled with g and the header says g, so a file that mixes two saves cannot pass for whole.
_SAVER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from trainer.io import save_lora
path, first = sys.argv[2], int(sys.argv[3])
name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
g = first
while True:
    w = {name + ".lora_down.weight": torch.full((64, 32768), float(g)),  # 8 MiB per tensor
         name + ".lora_up.weight": torch.full((32768, 64), float(g)),
         name + ".alpha": torch.tensor(64.0)}
    save_lora(path, w, {"generation": str(g)})
    print(g, flush=True)
    g += 1
"""


def _generation_of_complete_file(path) -> int:
    """The generation a file holds, after checking it is whole and self-consistent."""
    weights, metadata = load_lora(path)  # parses the header and every tensor, refuses a damaged file
    g = int(metadata["generation"])
    assert metadata["sshs_model_hash"] == weights_hash({k: v for k, v in weights.items()})
    for key, tensor in weights.items():
        if not key.endswith(".alpha"):
            assert bool((tensor == g).all()), f"{key} mixes generations"
    return g


def test_kill_9_during_saves_leaves_the_previous_or_the_new_file_never_a_partial_one(tmp_path):
    import random
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "lora.safetensors"
    rng = random.Random(1234)
    generation, temps_left, kills = 0, 0, 6
    for attempt in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, REPO_ROOT, str(path), str(generation + 1)],
                                stdout=subprocess.PIPE, text=True)
        try:
            # Wait for the first complete save of this process, then kill it: at a random moment
            # (building, hashing, writing, fsyncing or renaming its next generation), or, every
            # other time, as soon as its temp file appears (in the middle of the write).
            line = proc.stdout.readline()
            assert line.strip(), f"the saving process died before its first save (rc={proc.wait()})"
            if attempt % 2:
                temp = tmp_path / f".{path.name}.tmp-{proc.pid}"
                deadline = time.monotonic() + 30
                while not temp.exists() and time.monotonic() < deadline:
                    pass
                time.sleep(rng.uniform(0.0, 0.002))
            else:
                time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        found = _generation_of_complete_file(path)
        assert found >= int(line), (found, line)
        generation = found
        temps = [n for n in os.listdir(tmp_path) if n != path.name]
        assert all(n.startswith(f".{path.name}.tmp-") for n in temps), temps
        assert len(temps) <= 1, f"the previous save's leftover was not removed: {temps}"
        temps_left += len(temps)
    # Kills that landed mid-write left debris, which the next process's first save removed.
    assert temps_left >= 2, "no kill landed during a write: the test proved nothing"
    save_lora(path, make_weights(), meta())  # the next save in this process cleans up the last one
    assert os.listdir(tmp_path) == [path.name]


def test_stale_temp_files_of_live_processes_and_other_paths_are_left_alone(tmp_path):
    path = tmp_path / "a.safetensors"
    live = tmp_path / f".a.safetensors.tmp-{os.getppid()}"  # the parent process is alive
    other = tmp_path / ".b.safetensors.tmp-999999999"  # another file's temp: not ours to judge
    live.write_bytes(b"x")
    other.write_bytes(b"x")
    save_lora(path, make_weights(), meta())
    assert live.exists() and other.exists()
