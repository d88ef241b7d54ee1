"""Where files may be written: a user-typed name must stay inside its models folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigError

_NAME_PART = re.compile(r"^[\w\-. ()\[\]+]+$", re.UNICODE)


def safe_child_path(root: str | os.PathLike, name: str, ext: str = ".safetensors", field: str = "filename") -> Path:
    """root/name(.ext), refusing anything that could land outside root.

    Refused: absolute paths, drive letters, '..' parts, empty parts, odd characters, and any path
    whose resolved location (symlinks followed) is not inside the resolved root. Sub-folders
    ("characters/alice") are allowed and created by the writer.
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
    if ext and not parts[-1].lower().endswith(ext):
        parts[-1] += ext
    root_real = Path(os.path.realpath(root))
    target = root_real.joinpath(*parts)
    resolved = Path(os.path.realpath(target))
    if resolved != root_real and root_real not in resolved.parents:
        raise ConfigError(field, f"{raw!r} leads outside {root_real} (through a link); choose another name.")
    return resolved


def next_free(path: Path) -> Path:
    """path, or path with _2, _3 ... before the extension: files are never silently overwritten."""
    if not path.exists():
        return path
    stem, suffix = path.name[: -len(path.suffix)] if path.suffix else path.name, path.suffix
    n = 2
    while True:
        candidate = path.with_name(f"{stem}_{n}{suffix}")
        if not candidate.exists():
            return candidate
        n += 1
