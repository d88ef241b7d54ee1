"""Never continue a LoRA on a different model, never reuse stale latents, Cancel while encoding.

Against the shared real ComfyUI server (conftest.comfy_server), with two copies of the tiny SD1.5
checkpoint that differ from it in one tensor in the middle of the file: one in the UNet, one in
the VAE. Every other tensor is the same, so a fingerprint that looks at a few tensors only would
call them the same model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
for p in (str(HERE), str(REPO_ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from comfy_server import execution_error, status_str  # noqa: E402
from tiny_models import DATASET_DIR_NAME, TINY_CKPT_NAME, UNET_PREFIX, VAE_PREFIX, make_dataset  # noqa: E402
from headless.workflow import CKPT, DATASET, NETWORK, OPTIMIZER, PRECISION, SWEEP, SWEEP_SAVE, TRAIN, TrainingOptions, training_prompt  # noqa: E402

UNET_CHANGED = "lora_lab_tiny_unet_changed.safetensors"
VAE_CHANGED = "lora_lab_tiny_vae_changed.safetensors"
NEW_LORA = "Started a new LoRA"


def _changed_copy(src: Path, dest: Path, prefix: str) -> str:
    """dest: src with the middle weight tensor under `prefix` scaled by 1.05. Returns its name."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src))
    names = sorted(k for k in sd if k.startswith(prefix) and k.endswith(".weight") and sd[k].numel() > 64)
    name = names[len(names) // 2]
    assert name not in (names[0], names[-1])
    sd[name] = sd[name] * 1.05
    save_file(sd, str(dest))
    return name


@pytest.fixture(scope="module")
def srv(comfy_server, tiny_checkpoint):
    checkpoints = comfy_server.models_dir / "checkpoints"
    _changed_copy(tiny_checkpoint, checkpoints / UNET_CHANGED, UNET_PREFIX)
    _changed_copy(tiny_checkpoint, checkpoints / VAE_CHANGED, VAE_PREFIX)
    return comfy_server


def options(**kw) -> TrainingOptions:
    o = dict(
        checkpoint=TINY_CKPT_NAME, dataset=DATASET_DIR_NAME, output_name="integrity", resolution=64, steps=1, rank=4, alpha=4.0,
        mixed_precision="fp32", gradient_checkpointing=False, unet_lr=1e-3, scheduler="constant", warmup_ratio=0.0,
        test_size=64, test_steps=1, test_cfg=1.0, strengths="1.0",
    )
    o.update(kw)
    return TrainingOptions(**o)


def train_prompt(node: str, **kw) -> dict:
    """The example workflow's training part only, its Train node at `node`, mode continue."""
    full = training_prompt(options(**kw))
    prompt = {k: full[k] for k in (CKPT, DATASET, NETWORK, OPTIMIZER, PRECISION)}
    prompt[node] = dict(full[TRAIN], inputs=dict(full[TRAIN]["inputs"], mode="continue"))
    return prompt


def sweep_prompt(node: str, **kw) -> dict:
    """train_prompt + the example's Strength Sweep of that Train node's LoRA (it samples a patched clone)."""
    full = training_prompt(options(**kw))
    prompt = train_prompt(node, **kw)
    for k in (SWEEP, SWEEP_SAVE, "10", "11", "12"):  # sweep, its SaveImage, prompts, latent
        prompt[k] = full[k]
    prompt[SWEEP]["inputs"]["lora"] = [node, 1]
    return prompt


def notes(entry, node) -> str:
    return " | ".join(entry["outputs"][node]["lora_lab"][0]["notes"])


def step(entry, node) -> int:
    return entry["outputs"][node]["lora_lab"][0]["step"]


def dataset_text(entry) -> str:
    return entry["outputs"][DATASET]["text"][0]


def test_a_sweep_between_runs_continues_and_a_changed_middle_tensor_starts_a_new_lora(srv):
    node = "191"
    first = srv.run(train_prompt(node), timeout=900)
    assert step(first, node) == 1
    # The sweep loads LoRA-patched clones of the same MODEL: ComfyUI writes the patches into the
    # shared weights in place. The next run must still see the model it trained on.
    swept = srv.run(sweep_prompt(node), timeout=900)
    assert srv.output_file(swept["outputs"][SWEEP_SAVE]["images"][0]).is_file()
    assert step(swept, node) == 2 and NEW_LORA not in notes(swept, node), notes(swept, node)
    again = srv.run(train_prompt(node), timeout=900)
    assert step(again, node) == 3 and NEW_LORA not in notes(again, node), notes(again, node)

    other = srv.run(train_prompt(node, checkpoint=UNET_CHANGED), timeout=900)
    assert "Started a new LoRA: the model changed" in notes(other, node), notes(other, node)
    assert step(other, node) == 1
    # Same VAE and CLIP in that file: the dataset's latents were reused, not re-encoded.
    assert dataset_text(other).endswith("encoded: 0, from cache: 8"), dataset_text(other)


def test_a_changed_middle_vae_tensor_re_encodes_the_latents(srv):
    prompt = {k: v for k, v in train_prompt("192").items() if k in (CKPT, DATASET)}
    srv.run(prompt, timeout=900)  # encoded with the tiny checkpoint's VAE (now or by an earlier test)
    prompt[CKPT]["inputs"]["ckpt_name"] = VAE_CHANGED
    changed = srv.run(prompt, timeout=900)
    assert dataset_text(changed).endswith("encoded: 8, from cache: 0"), dataset_text(changed)


def _cache_files(srv) -> set[Path]:
    return set((srv.user_dir / "lora_lab" / "cache").rglob("*.safetensors"))


def test_cancel_while_encoding_keeps_what_was_encoded_and_a_requeue_encodes_only_the_rest(srv):
    n = 32
    make_dataset(srv.input_dir / "cancel_encoding", n=n, size=64, seed=12)
    prompt = {k: v for k, v in train_prompt("193", dataset="cancel_encoding").items() if k in (CKPT, DATASET)}
    before = _cache_files(srv)
    pid = srv.queue(prompt)
    deadline = time.monotonic() + 600
    while not (_cache_files(srv) - before):  # the first image is encoded and cached: press Cancel
        assert time.monotonic() < deadline and not srv.history(pid), "encoding never started, or finished at once"
        time.sleep(0.02)
    srv.interrupt()
    entry = srv.wait(pid, timeout=600)
    err = execution_error(entry)
    assert err and err["event"] == "execution_interrupted" and err["node_id"] == DATASET, entry["status"]
    kept = len(_cache_files(srv) - before)
    assert 1 <= kept < n, kept

    again = srv.run(prompt, timeout=900)
    assert status_str(again) == "success"
    assert dataset_text(again).endswith(f"encoded: {n - kept}, from cache: {kept}"), dataset_text(again)
    assert len(_cache_files(srv) - before) == n


def test_a_failed_save_every_names_the_file_and_keeps_the_training_state(srv):
    node = "194"
    blocker = srv.models_dir / "loras" / "blocked"  # a file where save_every's sub-folder goes
    blocker.write_text("not a folder")
    prompt = train_prompt(node, output_name="blocked/run", steps=2)
    prompt[node]["inputs"]["save_every"] = 1
    try:
        entry = srv.run(prompt, timeout=900, check=False)
        err = execution_error(entry)
        assert err and err["node_id"] == node, entry["status"]
        message = err["exception_message"]
        assert str(blocker / "run-step000001.safetensors") in message and "writable" in message, message
        assert "Traceback" not in message and "Errno" not in message.split(":")[0], message
    finally:
        blocker.unlink()
    again = srv.run(prompt, timeout=900)  # the step before the failed save was kept
    assert step(again, node) == 2 and NEW_LORA not in notes(again, node), notes(again, node)
    saved = again["outputs"][node]["lora_lab"][0]["saved"]
    assert saved == [str(srv.models_dir.resolve() / "loras" / "blocked" / "run-step000002.safetensors")], saved


def test_an_unwritable_cache_folder_trains_without_the_cache_and_says_so(srv):
    cache = srv.user_dir / "lora_lab" / "cache"
    aside = cache.with_name("cache.aside")
    cache.parent.mkdir(parents=True, exist_ok=True)
    if cache.exists():
        cache.rename(aside)
    cache.write_text("a file where the cache folder goes")
    try:
        make_dataset(srv.input_dir / "no_cache", n=2, size=64, seed=21)
        entry = srv.run(train_prompt("195", dataset="no_cache"), timeout=900)
        text = dataset_text(entry)
        assert f"the encoding cache folder {cache} is not writable" in text and text.endswith("encoded: 2, from cache: 0"), text
        assert step(entry, "195") == 1
    finally:
        cache.unlink()
        if aside.exists():
            aside.rename(cache)
