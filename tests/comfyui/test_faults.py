"""When things go wrong: Cancel at random steps, a write error while saving, running out of memory,
a NaN batch, and the session store letting go of a session whose node was restarted or deleted.

Everything that crosses the node boundary runs in a real ComfyUI: over HTTP against the shared
server (conftest.comfy_server), or, for faults a test cannot provoke from outside (out of memory,
a NaN in the middle of a step), in a separate Python process that loads ComfyUI and this pack the
way ComfyUI does and calls the nodes' functions with the model's forward patched to fail. That
process is this file, run as a script (see `_in_process`).
"""

from __future__ import annotations

import json
import random
import subprocess
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
from tiny_models import DATASET_DIR_NAME, TINY_CKPT_NAME, make_dataset  # noqa: E402
from test_frontend import browser  # noqa: E402,F401  (the Chromium fixture)
from headless.workflow import CKPT, DATASET, NETWORK, OPTIMIZER, PRECISION, TRAIN, TrainingOptions, training_prompt  # noqa: E402

SESSIONS = "/lora_lab/sessions"
RELEASE = "/lora_lab/release"


def train_prompt(node: str, output_name: str, steps: int, mode: str = "continue", **options) -> dict:
    """The example workflow's training part only (no save, sweep or report), Train node at `node`."""
    o = dict(
        checkpoint=TINY_CKPT_NAME, dataset=DATASET_DIR_NAME, output_name=output_name, resolution=64, steps=steps,
        mixed_precision="fp32", gradient_checkpointing=False, unet_lr=2e-3, scheduler="constant", warmup_ratio=0.0,
    )
    o.update(options)
    full = training_prompt(TrainingOptions(**o))
    prompt = {k: full[k] for k in (CKPT, DATASET, NETWORK, OPTIMIZER, PRECISION)}
    prompt[node] = dict(full[TRAIN], inputs=dict(full[TRAIN]["inputs"], mode=mode))
    return prompt


def train_ui(entry, node):
    return entry["outputs"][node]["lora_lab"][0]


def sessions(srv, alive=False) -> dict:
    return srv.get_json(SESSIONS + ("?alive=1" if alive else ""))


def session_step(srv, node) -> int | None:
    for s in sessions(srv)["sessions"]:
        if s["key"] == f"train:{node}":
            return s["step"]
    return None


def interrupt_at(srv, prompt, node, step, timeout=1800):
    """Queues `prompt`, presses Cancel once the session's live step reaches `step`, and returns
    the step training stopped at."""
    pid = srv.queue(prompt)
    deadline = time.monotonic() + timeout
    while (session_step(srv, node) or 0) < step:
        assert time.monotonic() < deadline, f"training never reached step {step}"
        assert not srv.history(pid), f"the run finished before step {step}: {status_str(srv.history(pid)[pid])}"
        time.sleep(0.1)
    srv.interrupt()
    entry = srv.wait(pid, timeout=timeout)
    err = execution_error(entry)
    assert err and err["event"] == "execution_interrupted" and err["node_id"] == node, entry["status"]
    return session_step(srv, node)


# ------------------------------------------------------------------ Cancel at random steps

def test_cancel_at_random_steps_then_queue_again_equals_an_uninterrupted_run(comfy_server):
    srv = comfy_server
    steps = 40
    rng = random.Random(20261124)
    points = [rng.randint(3, 9), rng.randint(16, 22), rng.randint(29, 34)]  # seeded, 7+ steps apart
    prompt = train_prompt("61", "cancel_random", steps)
    stops = []
    for k in points:
        stopped = interrupt_at(srv, prompt, "61", k)
        assert k <= stopped < steps, (k, stopped)
        stops.append(stopped)
    resumed = train_ui(srv.run(prompt, timeout=1800), "61")
    assert resumed["step"] == steps
    twin = train_ui(srv.run(train_prompt("62", "cancel_twin", steps), timeout=1800), "62")
    assert twin["step"] == steps
    assert len(resumed["history"]["loss"]) == steps
    assert resumed["history"]["loss"] == twin["history"]["loss"], f"cancelled at {stops}"


# ------------------------------------------------------------------ a write error while saving

def test_write_error_in_save_lora_names_the_problem_keeps_the_old_file_and_the_server_serves(comfy_server):
    srv = comfy_server
    from trainer.io import load_lora

    loras = srv.models_dir / "loras"
    target = loras / "write_error.safetensors"
    prompt = train_prompt("63", "write_error", 2, mode="restart")
    prompt["64"] = {"class_type": "LoRALabSaveLoRA", "inputs": {"lora": ["63", 1], "filename": "write_error", "overwrite": True}}
    srv.run(prompt, timeout=600)  # a first, good save
    before = target.read_bytes()
    # The temp file the server writes is taken by a folder: the write fails as it would on a
    # read-only or full disk (chmod would not stop a test running as root).
    blocker = loras / f".{target.name}.tmp-{srv.proc.pid}"
    blocker.mkdir()
    try:
        entry = srv.run(prompt, timeout=600, check=False)
        err = execution_error(entry)
        assert status_str(entry) == "error" and err["node_id"] == "64", entry["status"]
        message = err["exception_message"]
        assert str(target) in message and "Is a directory" in message, message
        assert "writable" in message and "free space" in message and "previous file there is unchanged" in message, message
        assert "Traceback" not in message
        assert target.read_bytes() == before
        load_lora(target)
    finally:
        blocker.rmdir()
    entry = srv.run(prompt, timeout=600)  # the server still serves, and saving works again
    assert entry["outputs"]["64"]["text"] == [str(target)]
    assert target.read_bytes() != before
    assert sorted(p.name for p in loras.glob(".write_error*")) == []


# ------------------------------------------------------------------ the session store

def test_restart_replaces_the_session_and_frees_the_old_one(comfy_server):
    srv = comfy_server
    first = srv.run(train_prompt("71", "restarted", 3), timeout=600)
    assert train_ui(first, "71")["step"] == 3
    listed = {s["key"]: s for s in sessions(srv)["sessions"]}
    old = listed["train:71"]
    second = srv.run(train_prompt("71", "restarted", 2, mode="restart"), timeout=600)
    assert train_ui(second, "71")["step"] == 2  # a new LoRA: 2 steps, not 3 + 2
    now = sessions(srv, alive=True)
    new = [s for s in now["sessions"] if s["key"] == "train:71"]
    assert len(new) == 1 and new[0]["step"] == 2 and new[0]["started_at"] > old["started_at"]
    # The old session is gone from memory, not only from the list: every session the server
    # still holds is a listed one.
    assert now["alive"] == len(now["sessions"]), now


def test_release_route_forgets_a_deleted_nodes_session(comfy_server):
    srv = comfy_server
    srv.run(train_prompt("72", "released", 2), timeout=600)
    assert session_step(srv, "72") == 2
    assert srv.post_json(RELEASE, {"node_id": "72"}) == {"released": True, "key": "train:72"}
    now = sessions(srv, alive=True)
    assert "train:72" not in [s["key"] for s in now["sessions"]]
    assert now["alive"] == len(now["sessions"]), now
    assert srv.post_json(RELEASE, {"node_id": 72}) == {"released": False, "key": "train:72"}
    status, body = srv.request("POST", RELEASE, {"node": "72"})
    assert status == 400 and "node_id" in body["error"]
    # Queueing the node again starts a new LoRA.
    assert train_ui(srv.run(train_prompt("72", "released", 2), timeout=600), "72")["step"] == 2


def test_deleting_the_train_node_in_the_browser_frees_its_session(comfy_server, browser):
    from test_frontend import open_page

    srv = comfy_server
    prompt = train_prompt("73", "deleted_in_browser", 1)
    srv.run(prompt, timeout=600)
    assert session_step(srv, "73") == 1
    page, console = open_page(browser, srv.url)
    try:
        # Loading a workflow clears the graph, which calls onRemoved on every node: the second
        # load clears the first one's Train node 73, and that must not cost it its session.
        page.evaluate("""async (p) => {
            const app = window.comfyAPI.app.app;
            await app.loadApiJson(p, "release_a");
            await app.loadApiJson(p, "release_b");
        }""", prompt)
        time.sleep(2.0)
        assert session_step(srv, "73") == 1, "loading a workflow released a session"
        deleted = page.evaluate("""() => {
            const app = window.comfyAPI.app.app;
            const node = app.graph.getNodeById(73);
            if (!node || node.type !== "LoRALabTrain") return false;
            app.graph.remove(node);
            return true;
        }""")
        assert deleted, "the loaded workflow has no Train node 73"
        deadline = time.monotonic() + 30
        while session_step(srv, "73") is not None:
            assert time.monotonic() < deadline, "deleting the node did not release its session"
            time.sleep(0.25)
        assert console.ours() == [], console.ours()
    finally:
        page.close()


# ------------------------------------------------------------------ out of memory and NaN, in process

def _in_process(comfyui: str, base: str) -> dict:
    """Loads ComfyUI (CPU) and this pack into this process, as ComfyUI's executor would, and runs
    the Train node with the model's forward patched to fail. Prints a JSON summary."""
    import in_process

    pack = in_process.load(comfyui, base)
    import torch

    base_dir = Path(base)
    import comfy.sd
    from lora_lab.nodes.common import LoRALabNodeError
    from lora_lab.nodes.lora import LoRALabSaveLoRA
    from lora_lab.trainer.io import load_lora
    from lora_lab.trainer.network import NetworkConfig
    from lora_lab.trainer.optimizers import OptimizerConfig
    from lora_lab.trainer.precision import PrecisionConfig
    from lora_lab.trainer.schedule import ScheduleConfig
    from lora_lab.trainer.sessions import STORE, node_key

    Train, Dataset = pack.NODE_CLASS_MAPPINGS["LoRALabTrain"], pack.NODE_CLASS_MAPPINGS["LoRALabDataset"]
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(base_dir / "checkpoints" / TINY_CKPT_NAME), output_vae=True, output_clip=True)[:3]
        dataset = Dataset().load(str(base_dir / "input" / DATASET_DIR_NAME), vae, clip, 64, True, 1, "")["result"][0]
    settings = dict(dataset=dataset, batch_size=1, gradient_accumulation=1, seed=3, network=NetworkConfig(rank=4, alpha=4.0),
                    optimizer=(OptimizerConfig(unet_lr=2e-3), ScheduleConfig(name="constant")), precision=PrecisionConfig(mixed_precision="fp32"))

    def train(node, steps):
        with torch.inference_mode():
            return Train().train(model, steps=steps, mode="continue", output_name=f"faults_{node}", unique_id=node, **settings)["result"]

    # Every forward of the diffusion model passes here; `fault` decides, from the node's live
    # session, whether this one fails.
    diffusion_model = model.model.diffusion_model
    forward = diffusion_model.forward
    fault: dict = {}

    def patched(*args, **kwargs):
        entry = STORE.get(node_key(fault.get("node")))
        if entry is not None and entry.session.step == fault.get("at_step") and torch.is_grad_enabled() and not fault.get("done"):
            fault["done"] = True
            if fault["kind"] == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return forward(*args, **kwargs) * float("nan")
        return forward(*args, **kwargs)

    diffusion_model.forward = patched
    out: dict = {}

    # Out of memory in step 5 of 8, then queue again.
    steps = 8
    fault.update(node="81", at_step=4, kind="oom")
    try:
        train("81", steps)
        out["oom_error"] = None
    except LoRALabNodeError as e:
        out["oom_error"] = str(e)
        out["oom_error_type"] = type(e).__name__
    out["step_after_oom"] = STORE.get(node_key("81")).session.step
    _, _, record = train("81", steps)
    out["resumed_losses"] = record.history.loss
    out["resumed_step"] = STORE.get(node_key("81")).session.step
    _, _, twin = train("82", steps)  # the same run, uninterrupted: another node, another session
    out["twin_losses"] = twin.history.loss

    # A NaN in step 3 of 8: skipped, rolled back, and the LoRA that comes out saves clean.
    fault.clear()
    fault.update(node="83", at_step=2, kind="nan")
    _, lora, record = train("83", steps)
    session = STORE.get(node_key("83")).session
    out["nan_steps"] = record.history.nan_steps
    out["nan_lr_scale"] = session.lr_scale
    out["nan_weights_finite"] = all(bool(torch.isfinite(t).all()) for t in lora.weights.values())
    saved = LoRALabSaveLoRA().save(lora, "after_nan", True)["result"][0]
    weights, meta = load_lora(saved)  # refuses non-finite values
    out["nan_saved_steps"] = meta["ss_steps"]
    print(json.dumps(out))
    return out


@pytest.fixture(scope="module")
def in_process(comfyui_path, tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("in_process")
    (base / "checkpoints").mkdir()
    (base / "checkpoints" / TINY_CKPT_NAME).symlink_to(tiny_checkpoint)
    make_dataset(base / "input" / DATASET_DIR_NAME, n=8, size=64, seed=0)
    r = subprocess.run([sys.executable, __file__, str(comfyui_path), str(base)], capture_output=True, text=True, timeout=900, cwd=str(REPO_ROOT))
    if r.returncode != 0:
        pytest.fail(f"the in-process ComfyUI run failed (rc={r.returncode})\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_out_of_memory_mid_step_is_a_clear_error_and_queueing_again_continues(in_process):
    out = in_process
    message = out["oom_error"]
    assert message is not None, "the simulated out-of-memory error never reached the node"
    assert out["oom_error_type"] == "LoRALabNodeError"
    assert message.startswith("out of memory in training step 5"), message
    assert "The 4 steps trained so far are kept" in message and "continue from step 4" in message, message
    for advice in ("gradient_checkpointing", "fp8_base", "batch_size", "smaller rank", "resolution"):
        assert advice in message, (advice, message)
    assert out["step_after_oom"] == 4
    # Queueing again finished the run, and the failed step left no trace: the loss curve is the
    # uninterrupted run's, step for step.
    assert out["resumed_step"] == 8
    assert out["resumed_losses"] == out["twin_losses"]


def test_nan_in_a_step_is_skipped_rolled_back_and_never_saved(in_process):
    out = in_process
    assert out["nan_steps"] == [3]
    assert out["nan_lr_scale"] == 0.5  # the LR backed off after the bad step
    assert out["nan_weights_finite"]
    assert out["nan_saved_steps"] == "8"


if __name__ == "__main__":
    _in_process(sys.argv[1], sys.argv[2])
