import torch

from trainer.cache import _path, cache_key, load_entry, save_entry


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"latent.0": torch.randn(4, 8, 8, generator=g), "cross_attn.0": torch.randn(77, 16, generator=g).half()}


def test_round_trip(tmp_path):
    key = cache_key("img", "vae", "clip")
    save_entry(tmp_path, key, _tensors())
    got = load_entry(tmp_path, key)
    assert got is not None and set(got) == set(_tensors())
    assert all(torch.equal(got[k], v) for k, v in _tensors().items())


def test_missing_tampered_truncated_or_foreign_entries_are_not_trusted(tmp_path):
    key = cache_key("a")
    assert load_entry(tmp_path, key) is None
    path = save_entry(tmp_path, key, _tensors())
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside a tensor
    path.write_bytes(bytes(data))
    assert load_entry(tmp_path, key) is None
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    assert load_entry(tmp_path, key) is None
    other = cache_key("b")
    save_entry(tmp_path, other, _tensors())
    _path(tmp_path, other).replace(path)  # a valid file under the wrong name
    assert load_entry(tmp_path, key) is None


def test_non_finite_entries_are_rebuilt(tmp_path):
    key = cache_key("nan")
    t = _tensors()
    t["latent.0"][0, 0, 0] = float("nan")
    save_entry(tmp_path, key, t)
    assert load_entry(tmp_path, key) is None


def test_key_depends_on_every_part():
    assert cache_key("a", "b") != cache_key("a", "c") != cache_key("ab")
