"""LoRA, LoKr, LoHa and DoRA against real ComfyUI, on a tiny SD1.5 and a tiny Flux.

For every algorithm and family, one process that loads ComfyUI (CPU) and this pack as ComfyUI's
executor does (this file run as a script, see `_in_process`) runs the pack's own nodes: Network ->
Train (with a held-out validation image) -> Save LoRA; then ComfyUI's stock LoraLoaderModelOnly
loads the saved file, and the model ComfyUI patches from it is compared with our training forward
(the bypass hooks) on the same input at strength 1 and 1.5. Two steps with fp8 base weights on Flux
(the family fp8 is for) check that path for each algorithm. One process for everything keeps this
module to a few minutes.

Tolerance of the comparison: max |patched − ours| <= 1e-4 · max |ours − base| + 1e-5 (the LoRA is
saved in fp32 here, so only float32 rounding separates the merged weight from the bypass form;
measured up to 5e-6 of the LoRA's effect).
"""

from __future__ import annotations

import json
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

from tiny_models import DATASET_DIR_NAME, TINY_CKPT_NAME, make_dataset  # noqa: E402
import in_process  # noqa: E402

ALGORITHMS = ("lora", "lokr", "loha", "dora")
FAMILIES = ("sd15", "flux")
STEPS = {"sd15": 4, "flux": 8}  # the tiny SD1.5 steps cost ~10x the tiny Flux ones on CPU
LR = {"sd15": 3e-3, "flux": 1e-2}
# LoKr's product starts smaller than LoRA's (one small factor multiplies another): the usual advice
# is a larger learning rate for it.
LR_FACTOR = {"lora": 1.0, "dora": 1.0, "lokr": 3.0, "loha": 1.0}


def _in_process(comfyui: str, base: str) -> dict:
    pack = in_process.load(comfyui, base)
    import torch

    base_dir = Path(base)
    import comfy.model_management
    import comfy.sd
    import tiny_models as tm
    from lora_lab.nodes.config import LoRALabNetwork
    from lora_lab.nodes.lora import LoRALabSaveLoRA
    from lora_lab.trainer.optimizers import OptimizerConfig
    from lora_lab.trainer.precision import PrecisionConfig
    from lora_lab.trainer.schedule import ScheduleConfig
    from lora_lab.trainer.sessions import STORE, node_key

    log_lines = in_process.capture_warnings()
    Train, Dataset = pack.NODE_CLASS_MAPPINGS["LoRALabTrain"], pack.NODE_CLASS_MAPPINGS["LoRALabDataset"]
    models = {}
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(base_dir / "checkpoints" / TINY_CKPT_NAME), output_vae=True, output_clip=True)[:3]
        models["sd15"] = (model, Dataset().load(str(base_dir / "input" / DATASET_DIR_NAME), vae, clip, 64, True, 1, "")["result"][0])
        flux = tm.load_tiny_flux(seed=0)
        models["flux"] = (flux, Dataset().load(str(base_dir / "input" / DATASET_DIR_NAME), tm.TinyVAE("flux"), tm.TinyTextEncoder("flux"), 64, True, 1, "")["result"][0])

    def train(node, family, algorithm, steps, **precision):
        model, dataset = models[family]
        network = LoRALabNetwork().build(rank=4, alpha=4.0, targets="attn_mlp", conv_rank=0, conv_alpha=1.0, dropout=0.0, algorithm=algorithm)[0]
        lr = LR[family] * LR_FACTOR[algorithm]
        extra = {"timestep_sampling": "flux_shift"} if family == "flux" else {}
        with torch.inference_mode():
            return Train().train(model, dataset, steps=steps, batch_size=1, gradient_accumulation=1, seed=5, mode="restart",
                                 output_name=f"{family}_{algorithm}", network=network, unique_id=node, validation_split=0.125,
                                 optimizer=(OptimizerConfig(unet_lr=lr), ScheduleConfig(name="constant")),
                                 precision=PrecisionConfig(mixed_precision="fp32", save_dtype="fp32", **precision), **extra)["result"]

    out: dict = {}
    t0 = time.monotonic()
    node = 100
    for family in FAMILIES:
        for algorithm in ALGORITHMS:
            node += 1
            r: dict = {}
            _, lora, record = train(str(node), family, algorithm, STEPS[family])
            r["val_loss"] = list(record.history.val_loss)
            saved = Path(LoRALabSaveLoRA().save(lora, f"{family}_{algorithm}", True)["result"][0])
            from safetensors import safe_open

            with safe_open(str(saved), "pt") as f:
                r["keys"] = sorted(f.keys())
                r["metadata"] = dict(f.metadata())
            session = STORE.get(node_key(str(node))).session
            den, net = session.denoiser, session.network
            r["parity"], r["not_loaded"] = in_process.parity(den, net, models[family][0], saved.name, session.examples[0], log_lines)
            comfy.model_management.unload_all_models()
            if family == "flux":  # fp8 base weights: two steps must run and give finite losses
                node += 1
                _, _, fp8_record = train(str(node), family, algorithm, 2, fp8_base=True)
                r["fp8_losses"] = list(fp8_record.history.loss)
            STORE.release(node_key(str(node)))
            STORE.release(node_key(str(node - 1)))
            out[f"{family}/{algorithm}"] = r
            print(f"{family}/{algorithm}: {time.monotonic() - t0:.0f} s, val {r['val_loss']}, parity {r['parity']}", file=sys.stderr, flush=True)
    print(json.dumps(out))
    return out


@pytest.fixture(scope="module")
def results(comfyui_path, tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("algorithms")
    (base / "checkpoints").mkdir()
    (base / "checkpoints" / TINY_CKPT_NAME).symlink_to(tiny_checkpoint)
    make_dataset(base / "input" / DATASET_DIR_NAME, n=8, size=64, seed=0)
    r = subprocess.run([sys.executable, __file__, str(comfyui_path), str(base)], capture_output=True, text=True, timeout=1500, cwd=str(REPO_ROOT))
    if r.returncode != 0:
        pytest.fail(f"in-process run failed (rc={r.returncode})\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


CASES = [f"{f}/{a}" for f in FAMILIES for a in ALGORITHMS]


@pytest.mark.parametrize("case", CASES)
def test_training_lowers_the_validation_loss(results, case):
    val = results[case]["val_loss"]
    assert len(val) >= 2 and val[-1] < val[0], val


@pytest.mark.parametrize("case", CASES)
def test_file_has_the_algorithms_keys_and_lycoris_metadata(results, case):
    algorithm = case.split("/")[1]
    r = results[case]
    suffixes = {k.split(".", 1)[1] for k in r["keys"]}
    expected = {
        "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
        "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_w2", "alpha"},
    }[algorithm]
    assert suffixes <= expected and "alpha" in suffixes and len(suffixes) >= 3, suffixes
    meta = r["metadata"]
    if algorithm == "lora":
        assert meta["ss_network_module"] == "networks.lora"
    else:
        assert meta["ss_network_module"] == "lycoris.kohya"
        args = json.loads(meta["ss_network_args"])
        assert args["algo"] == ("lora" if algorithm == "dora" else algorithm), args
        assert args.get("dora_wd") == ("True" if algorithm == "dora" else None)


@pytest.mark.parametrize("case", CASES)
def test_stock_loader_applies_every_key(results, case):
    assert results[case]["not_loaded"] == [], results[case]["not_loaded"][:5]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strength", ["1.0", "1.5"])
def test_model_patched_by_comfyui_matches_the_training_forward(results, case, strength):
    in_process.check_parity(results[case]["parity"][strength], min_effect=1e-3)  # trained: the LoRA changes the output


@pytest.mark.parametrize("case", [f"flux/{a}" for a in ALGORITHMS])
def test_fp8_base_weights_train_every_algorithm(results, case):
    losses = results[case]["fp8_losses"]
    assert len(losses) == 2 and all(l == l and abs(l) < float("inf") for l in losses), losses


if __name__ == "__main__":
    _in_process(sys.argv[1], sys.argv[2])
