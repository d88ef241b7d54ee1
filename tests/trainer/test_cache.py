import torch

from trainer.cache import CACHE_FORMAT, _path, cache_key, load_entry, pack_conditioning, save_entry, unpack_conditioning


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


def test_every_conditioning_entry_survives_the_cache(tmp_path):
    # Lumina 2's CLIP gives an attention mask, HunyuanDiT a second text embedding: extra_conds reads them.
    cross, pooled, mask, second = torch.randn(1, 5, 8), torch.randn(1, 4), torch.tensor([[1, 1, 1, 0, 0]]), torch.randn(1, 3, 6)
    cond = [[cross, {"pooled_output": pooled, "attention_mask": mask, "conditioning_mt5xl": second, "num_tokens": 3,
                     "guidance": 3.5, "hooks": ["not a tensor"]}]]
    tensors = {**pack_conditioning(cond, 0), **pack_conditioning([[cross * 2, {}]], 1)}
    save_entry(tmp_path, "k", tensors)
    loaded = load_entry(tmp_path, "k")
    got_cross, got_pooled, extras = unpack_conditioning(loaded, 0)
    assert torch.equal(got_cross, cross[0]) and torch.equal(got_pooled, pooled[0])
    assert set(extras) == {"attention_mask", "conditioning_mt5xl", "num_tokens", "guidance"}
    assert torch.equal(extras["attention_mask"], mask) and torch.equal(extras["conditioning_mt5xl"], second)
    assert extras["num_tokens"] == 3 and extras["guidance"] == 3.5
    cross1, pooled1, extras1 = unpack_conditioning(loaded, 1)
    assert torch.equal(cross1, cross[0] * 2) and pooled1 is None and extras1 == {}


def test_entries_of_an_older_cache_layout_are_never_read():
    assert CACHE_FORMAT == "2"
    # The format is part of every key: the same parts name another file than before.
    import hashlib
    assert cache_key("a", "b") != hashlib.sha256("a\x1fb".encode()).hexdigest()
