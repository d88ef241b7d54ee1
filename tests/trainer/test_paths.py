import os

import pytest

from trainer.errors import ConfigError
from trainer.paths import next_free, safe_child_path


def test_plain_and_nested_names_stay_inside(tmp_path):
    assert safe_child_path(tmp_path, "my_lora") == tmp_path.resolve() / "my_lora.safetensors"
    assert safe_child_path(tmp_path, "chars/alice.safetensors") == tmp_path.resolve() / "chars" / "alice.safetensors"


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/passwd", "C:\\x", "..", "", "a//b", ".hidden", "a\\..\\b", "a\x00b", "semi;colon"])
def test_escaping_or_odd_names_are_refused(tmp_path, name):
    with pytest.raises(ConfigError) as e:
        safe_child_path(tmp_path, name)
    assert e.value.field == "filename"


def test_symlink_pointing_outside_is_refused(tmp_path):
    root, outside = tmp_path / "loras", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(ConfigError, match="outside"):
        safe_child_path(root, "link/x")
    os.symlink(outside / "f.safetensors", root / "f.safetensors")
    with pytest.raises(ConfigError, match="outside"):
        safe_child_path(root, "f")


def test_next_free_never_overwrites(tmp_path):
    p = tmp_path / "a.safetensors"
    assert next_free(p) == p
    p.write_bytes(b"x")
    assert next_free(p) == tmp_path / "a_2.safetensors"
    (tmp_path / "a_2.safetensors").write_bytes(b"x")
    assert next_free(p) == tmp_path / "a_3.safetensors"
