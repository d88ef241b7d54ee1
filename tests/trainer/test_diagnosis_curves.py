"""The diagnosis on real training curves: histories recorded through the engine by
tests/trainer/curves/record.py (a pretrained toy denoiser, LoRAs trained with a new user's settings)."""

import json
from pathlib import Path

import pytest

from trainer.diagnosis import diagnose
from trainer.monitor import History

CURVES = sorted((Path(__file__).parent / "curves").glob("*.json"))
RECORDS = {path.stem: json.loads(path.read_text()) for path in CURVES}
HEALTHY = [name for name, r in RECORDS.items() if r["expected"] in ("learning", "converged", "no_trend")]


def reading(name: str, up_to_step: int | None = None):
    record = RECORDS[name]
    d = dict(record["history"])
    if up_to_step is not None:  # what the live chart showed at that step
        keep = [i for i, s in enumerate(d["step"]) if s <= up_to_step]
        for key in ("step", "loss", "lr", "smoothed", "epoch"):
            d[key] = [d[key][i] for i in keep]
        keep_val = [i for i, s in enumerate(d["val_step"]) if s <= up_to_step]
        d["val_step"] = [d["val_step"][i] for i in keep_val]
        d["val_loss"] = [d["val_loss"][i] for i in keep_val]
        keep_bleed = [i for i, s in enumerate(d["bleed_step"]) if s <= up_to_step]
        d["bleed_step"] = [d["bleed_step"][i] for i in keep_bleed]
        d["bleed_loss"] = [d["bleed_loss"][i] for i in keep_bleed]
        d["nan_steps"] = [s for s in d["nan_steps"] if s <= up_to_step]
        d["rollbacks"] = [r for r in d["rollbacks"] if r["step"] <= up_to_step]
    return diagnose(History.from_dict(d), record["total_steps"])


def test_the_corpus_covers_every_verdict_with_held_out_runs():
    expected = {r["expected"] for r in RECORDS.values()}
    assert {"learning", "converged", "overfitting", "not_learning", "diverged", "nan", "no_trend", "bleeding"} <= expected
    held_out = {r["expected"] for r in RECORDS.values() if r["held_out"]}
    assert {"learning", "converged", "overfitting", "not_learning", "diverged"} <= held_out


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_each_recorded_run_gets_its_verdict(name):
    d = reading(name)
    assert d.verdict == RECORDS[name]["expected"], (d.headline, d.evidence)
    json.dumps(d.evidence, allow_nan=False)


@pytest.mark.parametrize("name", HEALTHY)
def test_a_healthy_run_is_never_told_to_change_its_lr_nor_called_unstable(name):
    record = RECORDS[name]
    steps = record["history"]["step"]
    for up_to in sorted(set(steps[:: max(1, len(steps) // 40)] + [steps[-1]])):
        d = reading(name, up_to)
        assert d.verdict not in ("diverged", "nan", "overfitting"), (up_to, d.headline)
        assert not any("unet_lr" in a for a in d.advice), (up_to, d.advice)
        assert "too high" not in d.headline and "jumps" not in d.headline, (up_to, d.headline)


def test_issue_run_with_a_far_too_high_lr_is_diverged_against_the_base_model():
    # AdamW, constant lr 0.5: the run the old diagnosis called "overfitting".
    d = reading("diverged_0.5_constant")
    assert d.verdict == "diverged"
    assert "worse than the base model since step 8" in d.headline
    assert "far too high" in d.headline
    assert "5e-1 -> 5e-2" in d.advice[0]


def test_issue_run_that_learns_slowly_is_learning_slowly():
    # lr 2e-4 cosine: validation falls a few percent, per-step loss stays noisy. The old diagnosis
    # said "plateau high, raise unet_lr".
    d = reading("healthy_2e-4_cosine")
    assert d.verdict == "learning"
    assert d.headline.startswith("Learning (slowly): validation is 1.5% better than the base model")


def test_a_run_without_validation_says_its_verdict_is_weaker():
    d = reading("healthy_2e-4_no_validation")
    assert "Weaker verdict: no validation" in d.headline
    assert "validation_split" in d.advice[0]
    assert "high" not in d.headline


def test_the_nan_guard_rollbacks_are_stated():
    d = reading("nan_1e8")
    rollbacks = RECORDS["nan_1e8"]["history"]["rollbacks"]
    assert len(rollbacks) > 2
    assert f"rolled back {len(rollbacks)} times (step 2, 4, 6, 8, ...)" in d.headline
    assert f"{rollbacks[-1]['lr_scale']:g}x the plan" in d.headline
