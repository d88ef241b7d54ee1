import gc
import weakref

from tests.toys import ToyDenoiser, make_examples, make_network
from trainer.loop import Session, TrainConfig
from trainer.sessions import Entry, SessionStore, next_target, node_key


def make_entry(steps=4, target=0):
    d = ToyDenoiser()
    return Entry(Session(d, make_examples(), make_network(d), train=TrainConfig(steps=steps)), {"model": "m"}, target)


def test_release_forgets_the_session_and_frees_its_memory():
    store = SessionStore()
    entry = make_entry()
    gone = weakref.ref(entry.session)
    store.put(node_key(6), entry)
    assert store.keys() == ["train:6"] and store.alive() == 1
    del entry
    assert store.release(node_key("6")) is True
    gc.collect()
    assert gone() is None, "a released session is still referenced"
    assert store.keys() == [] and store.alive() == 0
    assert store.release(node_key(6)) is False  # releasing twice is harmless


def test_putting_a_new_session_under_the_same_key_frees_the_old_one():
    # What mode 'restart' does: the new session replaces the old one, which must not linger.
    store = SessionStore()
    first = make_entry()
    gone = weakref.ref(first.session)
    store.put("train:6", first)
    del first
    store.put("train:6", make_entry())
    assert store.alive() == 1 and gone() is None


def test_alive_counts_a_released_session_someone_still_holds():
    store = SessionStore()
    entry = make_entry()
    store.put("train:6", entry)
    store.release("train:6")
    assert store.keys() == [] and store.alive() == 1  # `entry` still holds it
    del entry
    assert store.alive() == 0


def test_describe_lists_step_and_target():
    store = SessionStore()
    entry = make_entry(steps=3)
    entry.session.run(until_step=2)
    entry.target_step = 3
    store.put("train:9", entry)
    assert store.describe() == [{"key": "train:9", "step": 2, "target_step": 3, "started_at": entry.session.started_at}]


def test_next_target_finishes_a_cancelled_run_first():
    entry = make_entry(steps=10)
    entry.session.run(until_step=3)
    entry.target_step = 5  # cancelled at 3 on the way to 5
    assert next_target(entry, 10) == 5
    entry.session.run(until_step=5)
    assert next_target(entry, 10) == 15


def test_out_of_memory_mid_step_keeps_the_session_resumable_bit_for_bit():
    import pytest
    import torch

    from trainer.errors import TrainingError

    def session():
        d = ToyDenoiser()
        return Session(d, make_examples(), make_network(d), train=TrainConfig(steps=6, gradient_accumulation=2))

    full = session()
    full.run()
    s = session()
    denoise, calls = s.denoiser.denoise, {"n": 0}

    def second_micro_batch_of_step_4_fails(*args):
        calls["n"] += 1
        if s.step == 3 and calls["n"] == 8:  # after the first micro-batch's backward
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return denoise(*args)

    s.denoiser.denoise = second_micro_batch_of_step_4_fails
    with pytest.raises(TrainingError, match=r"out of memory in training step 4 .*continue from step 3.*gradient_checkpointing"):
        s.run()
    assert s.step == 3 and len(s.history.loss) == 3
    assert all(p.grad is None for p in s.params), "the failed step's gradients were kept"
    s.run()
    assert s.history.loss == full.history.loss
