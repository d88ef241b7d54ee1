"""Wan video LoRAs against real ComfyUI: a folder of images and clips, encoded by ComfyUI's own Wan VAE.

One process loads ComfyUI (CPU) and this pack (see test_families.py for the pattern) and runs the
pack's Dataset node on a folder holding 64x64 images, two 9-frame clips, one clip too short and one
damaged video, with ComfyUI's Wan 2.1 VAE class (seeded weights: its temporal compression is real)
and the stand-in umT5 encoder; then trains the tiny Wan 2.1 T2V (tiny_families.py) on it with the
Train node, saves the LoRA, and compares the model ComfyUI's stock LoraLoaderModelOnly patches from
the file with our training forward on a clip's latent. Key names, the objective and the other
checks are in test_families.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
for p in (str(HERE), str(REPO_ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from tiny_models import make_dataset  # noqa: E402
import in_process  # noqa: E402

FRAMES, FPS, STEPS = 9, 16, 12
FOLDER = "wan_clips"


def write_clips(folder: Path) -> None:
    import av
    import numpy as np

    def mp4(path, n, moving=True):
        with av.open(str(path), "w", format="mp4") as c:
            s = c.add_stream("mpeg4", rate=FPS)
            s.width = s.height = 64
            s.pix_fmt = "yuv420p"
            for i in range(n):  # a bright square moving right over a gradient
                img = np.tile(np.linspace(40, 120, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
                x = 4 + 5 * i if moving else 20
                img[24:40, x:x + 16] = (230, 80 + 10 * i, 40)
                for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)

    mp4(folder / "walk_a.mp4", 12)
    (folder / "walk_a.txt").write_text("a photo of sks object moving right")
    mp4(folder / "walk_b.mp4", 10)
    (folder / "walk_b.txt").write_text("a photo of sks object sliding")
    mp4(folder / "blink.mp4", 3)
    (folder / "damaged.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x07" * 3000)


def _in_process(comfyui: str, base: str) -> dict:
    pack = in_process.load(comfyui, base, model_folders=("loras",))
    import torch

    base_dir = Path(base)
    from safetensors import safe_open
    from tiny_families import FamilyTextEncoder, load_tiny_family, wan_vae
    from lora_lab.nodes.config import LoRALabNetwork
    from lora_lab.nodes.lora import LoRALabSaveLoRA
    from lora_lab.trainer.optimizers import OptimizerConfig
    from lora_lab.trainer.precision import PrecisionConfig
    from lora_lab.trainer.schedule import ScheduleConfig
    from lora_lab.trainer.sessions import STORE, node_key

    log_lines = in_process.capture_warnings()
    Train, Dataset = pack.NODE_CLASS_MAPPINGS["LoRALabTrain"], pack.NODE_CLASS_MAPPINGS["LoRALabDataset"]
    r: dict = {}
    with torch.inference_mode():
        vae = wan_vae()
        out = Dataset().load(str(base_dir / "input" / FOLDER), vae, FamilyTextEncoder("wan21"), 64, True, 1, "", frames=FRAMES, fps=float(FPS))
        dataset = out["result"][0]
        r["summary"] = out["ui"]["text"][0]
        r["latents"] = {ex.name: list(ex.latents[0].shape) for ex in dataset.examples}
        model = load_tiny_family("wan21")
    network = LoRALabNetwork().build(rank=4, alpha=4.0, targets="attn_mlp", conv_rank=0, conv_alpha=1.0, dropout=0.0)[0]
    with torch.inference_mode():
        _, lora, record = Train().train(model, dataset, steps=STEPS, batch_size=1, gradient_accumulation=1, seed=5, mode="restart",
                                        output_name="wan_clips", network=network, unique_id="300", validation_split=0.2,
                                        optimizer=(OptimizerConfig(unet_lr=3e-3), ScheduleConfig(name="constant")),
                                        precision=PrecisionConfig(mixed_precision="fp32", save_dtype="fp32"), timestep_sampling="shift")["result"]
    r["loss"], r["val_loss"] = list(record.history.loss), list(record.history.val_loss)
    saved = Path(LoRALabSaveLoRA().save(lora, "wan_clips", True)["result"][0])
    with safe_open(str(saved), "pt") as f:
        r["metadata"] = dict(f.metadata())
    session = STORE.get(node_key("300")).session
    den, net = session.denoiser, session.network
    clip = next(ex for ex in session.examples + session.val_examples if ex.latents[0].shape[1] > 1)
    r["parity"], r["not_loaded"] = in_process.parity(den, net, model, saved.name, clip, log_lines, u=0.5, seed=2)
    print(json.dumps(r))
    return r


@pytest.fixture(scope="module")
def results(comfyui_path, tmp_path_factory):
    base = tmp_path_factory.mktemp("wan")
    folder = base / "input" / FOLDER
    make_dataset(folder, n=4, size=64, seed=2)
    write_clips(folder)
    r = subprocess.run([sys.executable, __file__, str(comfyui_path), str(base)], capture_output=True, text=True, timeout=1500, cwd=str(REPO_ROOT))
    if r.returncode != 0:
        pytest.fail(f"in-process run failed (rc={r.returncode})\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_clip_latents_have_wan_temporal_compression_and_images_are_one_frame(results):
    latents = results["latents"]
    clips = {k: v for k, v in latents.items() if k.endswith(".mp4")}
    assert set(clips) == {"walk_a.mp4", "walk_b.mp4"}
    assert all(v == [16, 1 + (FRAMES - 1) // 4, 8, 8] for v in clips.values()), clips  # T = 1 + (frames - 1) / 4
    images = [v for k, v in latents.items() if k.endswith(".png")]
    assert len(images) == 4 and all(v == [16, 1, 8, 8] for v in images), images


def test_short_and_damaged_videos_are_named_and_skipped(results):
    text = results["summary"]
    assert "blink.mp4" in text and f"shorter than {FRAMES} frames at {FPS} fps" in text, text
    assert "damaged.mp4" in text and "could not be decoded" in text, text
    assert "64x64x9f x2" in text, text  # the clips' bucket: size and frame count


def test_images_and_clips_train_together(results):
    loss, val = results["loss"], results["val_loss"]
    assert len(loss) == STEPS and all(v == v for v in loss)
    assert len(val) >= 2 and val[-1] < val[0], val
    assert results["metadata"]["ss_base_model_version"] == "wan"


@pytest.mark.parametrize("strength", ["1.0", "1.5"])
def test_stock_loader_patches_the_clip_forward_as_training_did(results, strength):
    assert results["not_loaded"] == []
    p = results["parity"][strength]
    assert p["shape"][2] == 3, p  # a clip's latent: 3 latent frames
    in_process.check_parity(p, min_effect=1e-4)


if __name__ == "__main__":
    _in_process(sys.argv[1], sys.argv[2])
