"""The recipe's promises in real ComfyUI: a run killed after a save_every checkpoint resumes after a
restart with the loss sequence of an uninterrupted twin; a state from another model is refused on
resume_from_state; continue_from onto another MODEL is refused; a chained run's file describes the
session that trained; an unconnected Precision input equals the Precision node at its defaults.

This module runs its own server, because it kills it (SIGKILL) and starts it again.
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

from comfy_server import execution_error  # noqa: E402
from conftest import _place, _serving  # noqa: E402
from test_integrity import UNET_CHANGED, _changed_copy  # noqa: E402
from tiny_models import DATASET_DIR_NAME, TINY_CKPT_NAME, UNET_PREFIX, make_dataset  # noqa: E402
from headless.server import ComfyServer  # noqa: E402
from headless.workflow import CKPT, DATASET, NETWORK, OPTIMIZER, PRECISION, TRAIN, TrainingOptions, node, training_prompt  # noqa: E402

STATE = "resumed-step000004.state.safetensors"


@pytest.fixture(scope="module")
def srv(comfyui_path, tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_resume")
    _place(tiny_checkpoint, base / "models" / "checkpoints" / TINY_CKPT_NAME)
    _changed_copy(tiny_checkpoint, base / "models" / "checkpoints" / UNET_CHANGED, UNET_PREFIX)
    make_dataset(base / "input" / DATASET_DIR_NAME, n=8, size=64, seed=0)
    yield from _serving(ComfyServer(comfyui_path, base))


def train_prompt(node_id: str, checkpoint=TINY_CKPT_NAME, **kw) -> dict:
    o = dict(checkpoint=checkpoint, dataset=DATASET_DIR_NAME, output_name="resume", resolution=64, steps=8, rank=4, alpha=4.0,
             mixed_precision="fp32", gradient_checkpointing=False, unet_lr=1e-3, test_size=64, test_steps=1, test_cfg=1.0, strengths="1.0")
    o.update(kw)
    full = training_prompt(TrainingOptions(**o))
    prompt = {k: full[k] for k in (CKPT, DATASET, NETWORK, OPTIMIZER, PRECISION)}
    prompt[node_id] = dict(full[TRAIN], inputs=dict(full[TRAIN]["inputs"], mode="restart"))
    return prompt


def info(entry, node_id) -> dict:
    return entry["outputs"][node_id]["lora_lab"][0]


def test_killed_after_a_save_every_checkpoint_resumes_like_an_uninterrupted_twin(srv):
    twin = info(srv.run(train_prompt("60", output_name="twin"), timeout=900), "60")
    assert twin["step"] == 8

    prompt = train_prompt("61", output_name="resumed")
    prompt["61"]["inputs"]["save_every"] = 4
    srv.queue(prompt)
    state = srv.output_dir / "lora_lab_states" / STATE
    deadline = time.monotonic() + 900
    while not state.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.is_file(), srv.log_tail()
    srv.proc.kill()  # ComfyUI is killed mid-run (or, on a fast machine, just after it): no clean shutdown
    srv.proc.wait()
    srv.proc = None
    srv.start()

    prompt = train_prompt("61", output_name="resumed")
    prompt["61"]["inputs"].update(mode="continue", resume_from_state=STATE)
    resumed = info(srv.run(prompt, timeout=900), "61")
    assert resumed["step"] == 8
    assert not any("Started a new LoRA" in n for n in resumed["notes"]), resumed["notes"]
    assert resumed["history"]["step"] == twin["history"]["step"] == list(range(1, 9))
    assert resumed["history"]["loss"] == twin["history"]["loss"]  # bit for bit, steps 5-8 included
    assert resumed["history"]["lr"] == twin["history"]["lr"]


def test_the_lr_preview_of_a_finished_run_shows_its_cycle_and_the_next_one(srv):
    import json
    import urllib.request

    body = {"scheduler": "cosine", "warmup_ratio": 0.05, "unet_lr": 1e-3, "steps": 8, "train_node": "61"}
    req = urllib.request.Request(srv.url + "/lora_lab/schedule_preview", data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        answer = json.loads(r.read())
    assert answer["continues_from"] == 8 and answer["steps"] == 16, answer
    plan = dict((int(s), lr) for s, lr in answer["points"])
    trained = info(srv.run(train_prompt("63", output_name="lr_twin"), timeout=900), "63")["history"]["lr"]
    assert [plan[k] for k in range(8)] == pytest.approx(trained, rel=1e-9)  # what the first 8 steps followed
    assert plan[7] < 0.1 * plan[8] and plan[8] == pytest.approx(1e-3)  # then a new cycle from the peak, not mid-curve
    assert [plan[8 + k] for k in range(8)] == pytest.approx(trained, rel=1e-9)  # the same 8-step cosine again


def test_a_state_from_another_model_is_refused_naming_the_input(srv):
    assert (srv.output_dir / "lora_lab_states" / STATE).is_file()
    prompt = train_prompt("62", checkpoint=UNET_CHANGED, output_name="other")
    prompt["62"]["inputs"].update(resume_from_state=STATE)
    err = execution_error(srv.run(prompt, timeout=900, check=False))
    assert err and err["node_id"] == "62", err
    assert err["exception_message"].startswith("resume_from_state:") and "model" in err["exception_message"], err


def _chain(second_model, **second_network) -> dict:
    """Train node 70 (rank 4, lr 1e-3) and a Train node 71 continuing its session."""
    prompt = train_prompt("70", steps=2, output_name="first")
    prompt["71"] = dict(prompt["70"], inputs=dict(prompt["70"]["inputs"], continue_from=["70", 1], model=second_model, mode="continue", output_name="second"))
    if second_network:
        prompt["73"] = node("LoRALabNetwork", **{**prompt[NETWORK]["inputs"], **second_network})
        prompt["74"] = node("LoRALabOptimizer", **{**prompt[OPTIMIZER]["inputs"], "unet_lr": 5e-4})
        prompt["71"]["inputs"].update(network=["73", 0], optimizer=["74", 0])
    return prompt


def test_continue_from_onto_another_model_is_refused(srv):
    prompt = _chain(["72", 0])
    prompt["72"] = node("CheckpointLoaderSimple", ckpt_name=UNET_CHANGED)
    err = execution_error(srv.run(prompt, timeout=900, check=False))
    assert err and err["node_id"] == "71", err
    assert err["exception_message"].startswith("continue_from:") and "model" in err["exception_message"], err


def test_a_chained_runs_file_describes_the_session_that_trained(srv):
    prompt = _chain([CKPT, 0], rank=8, alpha=8.0)
    prompt["75"] = node("LoRALabSaveLoRA", lora=["71", 1], filename="chained")
    entry = srv.run(prompt, timeout=900)
    assert info(entry, "71")["step"] == 4
    from safetensors import safe_open

    path = entry["outputs"]["75"]["text"][0]
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    # The session was built by node 70 (rank 4, alpha 4, lr 1e-3); node 71's own network and
    # optimizer inputs don't describe it.
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_learning_rate"], meta["ss_steps"]) == ("4", "4.0", "0.001", "4")


def test_an_unconnected_precision_input_is_the_precision_node_at_its_defaults(srv):
    defaults = {k: v[1]["default"] for k, v in srv.object_info("LoRALabPrecision")["input"]["required"].items()}
    with_node = train_prompt("80", steps=3, output_name="p1")
    with_node[PRECISION] = node("LoRALabPrecision", **defaults)
    without = train_prompt("81", steps=3, output_name="p2")
    del without["81"]["inputs"]["precision"]
    del without[PRECISION]
    a, b = info(srv.run(with_node, timeout=900), "80"), info(srv.run(without, timeout=900), "81")
    assert a["history"]["loss"] == b["history"]["loss"]
    memory = [n for n in a["notes"] if "memory" in n.lower()]
    assert memory and memory == [n for n in b["notes"] if "memory" in n.lower()], (a["notes"], b["notes"])
    assert defaults["gradient_checkpointing"] is True  # the default that an unconnected input used to drop
