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


# ------------------------------------------------------------------ names the filesystem would refuse

@pytest.mark.parametrize("name", ["a" * 300, "猫" * 100, "a" * 240, "a" * 223, "é" * 112, "sub/" + "b" * 230])
def test_names_whose_longest_file_does_not_fit_255_bytes_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="255-byte limit") as e:
        safe_child_path(tmp_path, name)
    assert e.value.field == "filename"


def test_the_longest_accepted_name_can_really_be_written_with_every_suffix(tmp_path):
    from trainer.paths import NEXT_FREE_MAX, temp_name

    for char, tail in (("a", ""), ("a", "-step1000000"), ("猫", ""), ("é", "-step1000000")):
        n = 1
        while True:  # the longest name of `char` that is accepted
            try:
                safe_child_path(tmp_path, char * (n + 1), tail=tail)
            except ConfigError:
                break
            n += 1
        path = safe_child_path(tmp_path, char * n, tail=tail)
        longest = path.with_name(temp_name(f"{char * n}{tail}_{NEXT_FREE_MAX}.safetensors", 4194304))
        longest.write_bytes(b"x")  # the OS accepts it
        assert len(longest.name.encode()) <= 255
        assert n >= 200 // len(char.encode())
    with pytest.raises(ConfigError, match="255-byte limit"):
        safe_child_path(tmp_path, "a" * 230, tail="-step1000000")
    assert safe_child_path(tmp_path, "a" * 200)


@pytest.mark.parametrize("name", ["CON", "nul", "COM1", "lpt9.safetensors", "sub/aux", "prn/x", "name.", "name. ", "dir./x", "dir /x"])
def test_windows_reserved_names_and_trailing_dots_or_spaces_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="reserves|ends with a dot or a space") as e:
        safe_child_path(tmp_path, name, field="output_name")
    assert e.value.field == "output_name"


def test_names_that_only_look_reserved_are_fine(tmp_path):
    for name in ("console", "CON1", "nullify", "com10", "my.lora"):
        assert safe_child_path(tmp_path, name).parent == tmp_path.resolve()


def test_next_free_stops_at_its_cap(tmp_path, monkeypatch):
    import trainer.paths as paths

    monkeypatch.setattr(paths, "NEXT_FREE_MAX", 4)
    base = tmp_path / "x.safetensors"
    for p in (base, tmp_path / "x_2.safetensors", tmp_path / "x_3.safetensors"):
        p.write_bytes(b"")
    assert next_free(base) == tmp_path / "x_4.safetensors"
    (tmp_path / "x_4.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="x_2 ... x_4.safetensors all exist") as e:
        next_free(base, field="output_name")
    assert e.value.field == "output_name"
