"""A toy denoiser learns new data through a LoRA with every optimizer; the saved file round-trips."""

import time

import pytest
import torch

from tests.toys import ToyDenoiser, make_examples, make_network
from trainer.io import build_metadata, load_lora, save_lora
from trainer.loop import Session, TrainConfig
from trainer.optimizers import OPTIMIZERS, OptimizerConfig
from trainer.schedule import ScheduleConfig

# Prodigy starts from a tiny step-size estimate and needs ~100 steps to find its own lr.
STEPS = {"Prodigy": 120}
LR = {"AdamW": 1e-2, "AdamW8bit": 1e-2, "Lion": 1e-2, "Lion8bit": 1e-2, "SGD": 0.3, "Prodigy": 1.0}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_lora_learns_and_the_saved_file_round_trips(optimizer, tmp_path):
    d = ToyDenoiser()
    net = make_network(d)
    session = Session(
        d,
        make_examples(),
        net,
        optimizer=OptimizerConfig(name=optimizer, unet_lr=LR[optimizer]),
        schedule=ScheduleConfig(name="cosine", warmup_ratio=0.05) if optimizer != "Prodigy" else ScheduleConfig(name="constant"),
        train=TrainConfig(steps=STEPS.get(optimizer, 50), batch_size=2, seed=3),
    )
    before = session.validation_loss(session.examples)
    session.run()
    after = session.validation_loss(session.examples)
    assert after < 0.9 * before, f"{optimizer}: {before:.4f} -> {after:.4f}"

    path = tmp_path / "toy.safetensors"
    meta = build_metadata(
        base_model="sd15", output_name="toy", network=net.config, learning_rate=LR[optimizer], text_encoder_lr=None,
        steps=session.step, epochs=None, started_at=time.time(), optimizer=optimizer, scheduler="cosine",
    )
    save_lora(path, net.to_kohya(), meta, dtype=torch.float32)
    weights, read_meta = load_lora(path)
    assert read_meta["ss_optimizer"] == optimizer and read_meta["ss_network_dim"] == "4"

    d2 = ToyDenoiser()  # same seed: the same base model
    net2 = make_network(d2)
    net2.load_kohya(weights)
    session2 = Session(d2, make_examples(), net2, train=TrainConfig(steps=1, batch_size=2, seed=3))
    assert session2.validation_loss(session2.examples) == pytest.approx(after, rel=1e-6)
