"""Data-parallel training on the toy denoiser: two processes (gloo, CPU, started by torchrun as the
headless command starts them) against one process that trains the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer.distributed import DataParallel  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402

STEPS, BATCH = 6, 2  # per process; 7 images make a ragged last batch (3 of a global 4)


def _session(data_parallel, batch_size, accumulation=1):
    from tests.toys import ToyDenoiser, make_examples, make_network
    from trainer.loop import Session, TrainConfig
    from trainer.optimizers import OptimizerConfig
    from trainer.schedule import ScheduleConfig

    d = ToyDenoiser()
    return Session(d, make_examples(n=7), make_network(d), optimizer=OptimizerConfig(unet_lr=1e-2), schedule=ScheduleConfig(name="cosine"),
                   train=TrainConfig(steps=STEPS, batch_size=batch_size, seed=3, gradient_accumulation=accumulation), data_parallel=data_parallel)


def _weights(session) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in session.network.state_dict().items()}


def test_slices_are_disjoint_contiguous_and_cover_the_batch():
    for n in (1, 3, 4, 7):
        for world in (1, 2, 3):
            parts = [DataParallel(r, world).part(list(range(n))) for r in range(world)]
            covered = [i for p in parts for i in range(n)[p]]
            assert covered == list(range(n)), (n, world, parts)


def test_bad_place_names_the_field():
    with pytest.raises(ConfigError, match="processes"):
        DataParallel(0, 0)
    with pytest.raises(ConfigError, match="rank"):
        DataParallel(2, 2)


def test_global_batch_larger_than_the_dataset_names_batch_size_and_processes():
    with pytest.raises(ConfigError, match=r"batch_size.*x 4 processes = 8"):
        _session(DataParallel(0, 4), 2)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "0", __file__, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-4000:]
    return [torch.load(out / f"rank{k}.pt") for k in (0, 1)]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_processes_equal_one_process_with_the_global_batch(two_processes, accumulation):
    ranks = [r[accumulation] for r in two_processes]
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key  # the same weights on every process
    single = _session(None, 2 * BATCH, accumulation)
    single.run()
    ref = _weights(single)
    num = sum(float((ranks[0]["weights"][k] - v).pow(2).sum()) for k, v in ref.items()) ** 0.5
    den = sum(float(v.pow(2).sum()) for v in ref.values()) ** 0.5
    assert num / den < 1e-5, num / den
    assert ranks[0]["loss"] == pytest.approx(single.history.loss, rel=1e-5)
    # Every step, the slices of both processes are disjoint and together are the global batch.
    for (idx0, a0, b0), (idx1, a1, b1) in zip(ranks[0]["slices"], ranks[1]["slices"]):
        assert idx0 == idx1 and (a0, b1) == (0, len(idx0)) and b0 == a1, (idx0, a0, b0, a1, b1)
    assert any(len(idx) == 3 for idx, _, _ in ranks[0]["slices"]), "no ragged batch was trained"


def _worker(out: Path) -> None:
    from trainer.distributed import join, leave

    torch.set_num_threads(1)
    results = {}
    for accumulation in (1, 2):
        dp = join(torch.device("cpu"), timeout_s=60, keep_slices=True)
        session = _session(dp, BATCH, accumulation)
        session.run()
        results[accumulation] = {"weights": _weights(session), "loss": list(session.history.loss), "slices": dp.slices}
    torch.save(results, out / f"rank{dp.rank}.pt")
    leave()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
