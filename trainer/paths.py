"""Where files may be written: a user-typed name must stay inside its models folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigError

_NAME_PART = re.compile(r"^[\w\-. ()\[\]+]+$", re.UNICODE)

# The filesystems' limits on one path component: 255 bytes of UTF-8 (Linux, macOS) and 255
# UTF-16 code units (Windows, NTFS, exFAT).
MAX_COMPONENT = 255
# next_free adds _2 ... _NEXT_FREE_MAX; beyond that the user must pick another name.
NEXT_FREE_MAX = 9999
# Device names Windows reserves in every folder, with or without an extension.
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_PID_DIGITS = 10  # the longest process id a temp name may carry


def temp_name(name: str, pid: int | str = "") -> str:
    """The hidden temp file an atomic save of `name` writes first (pid "" gives the prefix)."""
    return f".{name}.tmp-{pid}"


def _component_length(text: str) -> int:
    """The larger of its UTF-8 bytes and UTF-16 units (the stricter limit decides)."""
    return max(len(text.encode("utf-8")), len(text.encode("utf-16-le")) // 2)


def _check_component(part: str, field: str, folder: bool) -> None:
    if part != part.rstrip(". "):
        raise ConfigError(field, f"{part!r} ends with a dot or a space, which Windows drops from names; remove it.")
    if part.split(".")[0].strip().upper() in WINDOWS_RESERVED:
        raise ConfigError(field, f"{part!r} is a device name Windows reserves (CON, PRN, AUX, NUL, COM1-COM9, LPT1-LPT9, with any extension); choose another name.")
    if folder and _component_length(part) > MAX_COMPONENT:
        raise ConfigError(field, f"the folder name {_shown(part)} is {len(part.encode())} bytes long; folder names must stay within {MAX_COMPONENT} bytes. Use a shorter name.")


def _shown(text: str, keep: int = 40) -> str:
    return repr(text) if len(text) <= keep else repr(text[:keep]) + f"... ({len(text)} characters)"


def safe_child_path(root: str | os.PathLike, name: str, ext: str = ".safetensors", field: str = "filename", tail: str = "") -> Path:
    """root/name(.ext), refusing anything that could land outside root or that a filesystem refuses.

    Refused: absolute paths, drive letters, '..' parts, empty parts, odd characters, and any path
    whose resolved location (symlinks followed) is not inside the resolved root. Sub-folders
    ("characters/alice") are allowed and created by the writer. Also refused, so that no save
    fails half-way: names Windows reserves (CON, NUL, COM1...) or drops characters from
    (trailing dots and spaces), and names whose longest file does not fit MAX_COMPONENT: the
    name + `tail` (the longest text a writer inserts, e.g. "-step1000000") + next_free's
    "_9999" + `ext`, as the hidden temp file of an atomic save.
    """
    raw = str(name).strip()
    if not raw:
        raise ConfigError(field, "is empty: give the file a name such as my_lora.")
    if os.path.isabs(raw) or raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw):
        raise ConfigError(field, f"{raw!r} is an absolute path; give a name inside the folder, e.g. my_lora or sub/my_lora.")
    parts = re.split(r"[\\/]", raw)
    for part in parts:
        if part in ("", ".", ".."):
            raise ConfigError(field, f"{raw!r} contains an empty, '.' or '..' part; names must stay inside the folder.")
        if not _NAME_PART.match(part) or part.startswith("."):
            raise ConfigError(field, f"{part!r} has characters that are not allowed; use letters, digits, spaces, - _ . ( ) [ ] +.")
    for i, part in enumerate(parts):
        _check_component(part, field, folder=i < len(parts) - 1)
    stem = parts[-1][: -len(ext)] if ext and parts[-1].lower().endswith(ext) else parts[-1]
    longest = temp_name(f"{stem}{tail}_{NEXT_FREE_MAX}{ext}", "9" * _PID_DIGITS)
    excess = _component_length(longest) - MAX_COMPONENT
    if excess > 0:
        room = _component_length(stem) - excess
        raise ConfigError(
            field,
            f"the name {_shown(stem)} is {len(stem.encode())} bytes long (UTF-8); with what LoRA Lab adds to it "
            f"({tail + '_2' if tail else '_2'}{ext} and a temp file name) the file name would exceed the {MAX_COMPONENT}-byte limit "
            f"of file systems. Use at most {max(room, 0)} bytes (letters a-z count 1, most other characters 2-4).",
        )
    if ext and not parts[-1].lower().endswith(ext):
        parts[-1] += ext
    root_real = Path(os.path.realpath(root))
    target = root_real.joinpath(*parts)
    resolved = Path(os.path.realpath(target))
    if resolved != root_real and root_real not in resolved.parents:
        raise ConfigError(field, f"{raw!r} leads outside {root_real} (through a link); choose another name.")
    return resolved


def next_free(path: Path, field: str = "filename") -> Path:
    """path, or path with _2, _3 ... _NEXT_FREE_MAX before the extension: files are never silently
    overwritten. Raises ConfigError naming `field` when every one of them exists."""
    if not path.exists():
        return path
    stem, suffix = path.name[: -len(path.suffix)] if path.suffix else path.name, path.suffix
    for n in range(2, NEXT_FREE_MAX + 1):
        candidate = path.with_name(f"{stem}_{n}{suffix}")
        if not candidate.exists():
            return candidate
    raise ConfigError(field, f"{path.name} and {stem}_2 ... {stem}_{NEXT_FREE_MAX}{suffix} all exist in {path.parent}; "
                             "choose another name, move old files away, or turn overwrite on.")


def write_error(path: str | os.PathLike, exc: OSError, field: str = "filename") -> ConfigError:
    """An OS error while saving `path`, as the node's message: the file, the reason and the fix."""
    reason = exc.strerror or str(exc)
    return ConfigError(field, f"could not save {path}: {reason}. Check that the loras folder is writable, that no file "
                              "blocks a sub-folder of that name and that the disk has free space, or choose a shorter "
                              "or different name; any previous file there is unchanged.")
