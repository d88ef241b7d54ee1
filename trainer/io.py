"""The LoRA file: kohya-format safetensors with sd-scripts-compatible metadata.

The in-memory LoRA is a plain dict of tensors in kohya layout. For every adapted module ``NAME``
(e.g. ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``):

    NAME.lora_down.weight   [rank, in]          or [rank, in, kh, kw] for a conv
    NAME.lora_up.weight     [out, rank]         or [out, rank, 1, 1]
    NAME.alpha              0-dim; loaders apply scale = alpha / rank

This is the layout ComfyUI, A1111/Forge and diffusers all read, so it is the only one written.
Files are read and written with safetensors only: nothing here unpickles anything.

Public API:
    save_lora(path, weights, metadata, dtype=None) -> None
        Validate and write atomically (temp file + fsync + rename): a crash or a full disk never
        leaves a half-written file at `path`, and a previous file there stays as it was.
    load_lora(path) -> (weights, metadata)
        Read and validate a kohya-format file; a missing alpha is filled with alpha = rank.
    build_metadata(*, base_model, output_name, network, ...) -> dict[str, str]
        The ``ss_*`` and ``modelspec.*`` header keys other tools look for.
    atomic_write(path, data) -> None
        Any file, written the same way (resumable training states use it too).
    weights_hash(weights) -> str
        Deterministic sha256 of the tensors (names, dtypes, shapes, bytes).
    lora_modules(weights) -> dict[str, tuple[int, float]]
        Module name -> (rank, alpha).
    check_compatible(weights, expected_names, label) -> None
        Refuse a LoRA whose modules do not belong to the model being trained.

Errors meant for the user are `LoRALabError` (or `ConfigError` for a bad argument value).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes

if TYPE_CHECKING:
    from .network import NetworkConfig

from .errors import ConfigError, LoRALabError
from .paths import temp_name
from .profiles import Profile, profile_for

DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"
# Per-module tensors of each algorithm, as ComfyUI's loader (comfy/weight_adapter) reads them.
_PARTS = ((DOWN, "down"), (UP, "up"), (ALPHA, "alpha"), (".dora_scale", "dora_scale"),
          (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"), (".hada_w2_b", "hada_w2_b"),
          (".lokr_w1", "lokr_w1"), (".lokr_w2", "lokr_w2"), (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"),
          (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"))
_SUFFIX = {part: suffix for suffix, part in _PARTS}

SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_WRITE_CHUNK = 16 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# structure checks shared by save and load


def _split_modules(weights: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group kohya keys by module name; refuse keys that are not lora_down/lora_up/alpha."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in weights.items():
        for suffix, part in _PARTS:
            if key.endswith(suffix) and len(key) > len(suffix):
                modules.setdefault(key[: -len(suffix)], {})[part] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:3])
        raise LoRALabError(
            f"{len(unknown)} tensor(s) are not kohya / LyCORIS LoRA weights (e.g. {shown}). LoRA Lab reads and "
            "writes NAME.lora_down.weight / lora_up.weight (+ dora_scale), hada_w1_a ... (LoHa), lokr_w1 / "
            "lokr_w2(_a/_b) (LoKr) and NAME.alpha; diffusers-format, Tucker (t1/t2) or OFT files are not supported."
        )
    if not modules:
        raise LoRALabError("The LoRA holds no modules (no lora_down/lora_up, hada_ or lokr_ weights); nothing to use.")
    return modules


def _module_rank(name: str, parts: Mapping[str, torch.Tensor]) -> int:
    """Check that `name` has a complete set of tensors for one algorithm; return the rank its
    alpha is divided by (1 for a LoKr with both factors stored in full: ComfyUI ignores alpha there)."""
    algo = module_algorithm(parts)
    if algo == "loha":
        rank = _loha_rank(name, parts)
    elif algo == "lokr":
        rank = _lokr_rank(name, parts)
    else:
        rank = _lora_rank(name, parts)
    if "alpha" in parts and parts["alpha"].numel() != 1:
        raise LoRALabError(
            f"Module '{name}': alpha must be a single number, got shape {tuple(parts['alpha'].shape)}."
        )
    return rank


def module_algorithm(parts: Mapping[str, torch.Tensor]) -> str:
    """"lora", "dora", "loha" or "lokr" from the tensors a module has."""
    if any(p.startswith("hada_") for p in parts):
        return "loha"
    if any(p.startswith("lokr_") for p in parts):
        return "lokr"
    return "dora" if "dora_scale" in parts else "lora"


def _lora_rank(name: str, parts: Mapping[str, torch.Tensor]) -> int:
    missing = [p for p in ("down", "up") if p not in parts]
    if missing:
        # Every loader indexes both halves; a lone half crashes them instead of being skipped.
        raise LoRALabError(
            f"Module '{name}' has no lora_{missing[0]}.weight, only its other half. A LoRA module "
            "needs both lora_up and lora_down; the file is damaged or not a kohya LoRA."
        )
    down, up = parts["down"], parts["up"]
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoRALabError(
            f"Module '{name}': lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} must both "
            "be 2-D (linear) or both 4-D (conv)."
        )
    rank = int(down.shape[0])
    if up.shape[1] != rank or rank == 0:
        raise LoRALabError(
            f"Module '{name}': lora_down has rank {rank} (shape {tuple(down.shape)}) but lora_up "
            f"expects rank {int(up.shape[1])} (shape {tuple(up.shape)}); the halves do not belong together."
        )
    if "dora_scale" in parts and parts["dora_scale"].numel() not in (int(up.shape[0]), int(down.shape[1])):
        raise LoRALabError(
            f"Module '{name}': dora_scale has shape {tuple(parts['dora_scale'].shape)}, which fits neither the "
            "layer's outputs nor its inputs; the file is damaged."
        )
    return rank


def _pair_rank(name: str, parts: Mapping[str, torch.Tensor], a: str, b: str) -> int:
    """Rank of a factor pair a [rows, r] @ b [r, cols]; both must be there and fit."""
    if a not in parts or b not in parts:
        have, lack = (a, b) if a in parts else (b, a)
        raise LoRALabError(f"Module '{name}' has {have} but no {lack}; the file is damaged or incomplete.")
    ta, tb = parts[a], parts[b]
    if ta.ndim != 2 or tb.ndim != 2 or ta.shape[1] != tb.shape[0] or ta.shape[1] == 0:
        raise LoRALabError(
            f"Module '{name}': {a} {tuple(ta.shape)} and {b} {tuple(tb.shape)} do not multiply "
            "(expected [rows, r] and [r, cols]); the file is damaged."
        )
    return int(ta.shape[1])


def _loha_rank(name: str, parts: Mapping[str, torch.Tensor]) -> int:
    if "hada_t1" in parts or "hada_t2" in parts:
        raise LoRALabError(f"Module '{name}': Tucker LoHa (hada_t1/hada_t2) is not supported.")
    rank = _pair_rank(name, parts, "hada_w1_a", "hada_w1_b")
    _pair_rank(name, parts, "hada_w2_a", "hada_w2_b")
    return rank


def _lokr_rank(name: str, parts: Mapping[str, torch.Tensor]) -> int:
    rank = 1
    for w in ("lokr_w1", "lokr_w2"):
        if w in parts:
            continue
        if f"{w}_a" not in parts and f"{w}_b" not in parts:
            raise LoRALabError(f"Module '{name}' has no {w} (nor {w}_a/{w}_b); a LoKr module needs both factors.")
        rank = _pair_rank(name, parts, f"{w}_a", f"{w}_b")  # ComfyUI divides by the last decomposed factor's rank
    return rank


def _require_finite(name: str, part: str, tensor: torch.Tensor, note: str = "") -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise LoRALabError(
            f"Module '{name}': {part} contains NaN or infinite values{note}. Refusing to write a "
            "LoRA that would break every image it is applied to; keep the last good save instead."
        )


def _safetensors_path(path: str | os.PathLike, action: str) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise LoRALabError(
            f"Can only {action} .safetensors LoRA files, got '{p.name}'. Other formats (.ckpt, .pt, "
            ".bin) can run code when opened; convert the file to .safetensors first."
        )
    return p


# --------------------------------------------------------------------------------------------
# saving


def save_lora(
    path: str | os.PathLike,
    weights: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    dtype: torch.dtype | None = None,
) -> None:
    """Validate `weights` and write them with `metadata` to `path` atomically.

    - Every module must have lora_down, lora_up (matching ranks) and alpha; a lone half or a
      missing alpha is refused with a `LoRALabError` naming the module.
    - lora_up/lora_down are cast to `dtype` (float32, float16 or bfloat16; None keeps theirs).
      alpha is always written as a 0-dim float32: low-precision dtypes would round an alpha such
      as 0.3 and silently change the scale alpha/rank; every loader reads it with `.item()`.
    - Non-finite values (including fp16 overflow from the cast) are refused, naming the module.
    - ``sshs_model_hash`` is (re)computed from the tensors exactly as written, so the hash always
      describes the file; all other metadata is written as given and must be str -> str.
    - Parent folders are created. The data goes to a hidden temp file in the same folder, is
      flushed and fsynced, then renamed over `path`; on any error the temp file is removed and
      a previous file at `path` is left untouched.
      A process killed mid-write (kill -9, power loss) leaves its temp file behind
      (".NAME.safetensors.tmp-PID", never read by a loader); the next save to the same path
      deletes it.
    """
    target = _safetensors_path(path, "save")
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ConfigError(
            "save_dtype", f"expected one of fp32, fp16, bf16, got {dtype}; pick one of those."
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise LoRALabError(
                f"Metadata entry {key!r} must map a string to a string (got {type(value).__name__}); "
                "convert it with str() or json.dumps()."
            )

    tensors: dict[str, torch.Tensor] = {}
    for name, parts in sorted(_split_modules(weights).items()):
        _module_rank(name, parts)
        if "alpha" not in parts:
            raise LoRALabError(
                f"Module '{name}' has no alpha. Without it loaders use scale 1.0 instead of "
                "alpha/rank and the LoRA looks different than in training; pass its alpha."
            )
        for part in sorted(p for p in parts if p != "alpha"):
            src, suffix = parts[part], _SUFFIX[part]
            label = suffix.lstrip(".").replace(".weight", "")
            if not src.is_floating_point():
                raise LoRALabError(f"Module '{name}': {label} must be a float tensor, got {src.dtype}.")
            # copy=True: the written tensor must not share memory with a live training parameter.
            out = src.detach().to(device="cpu", dtype=dtype or src.dtype, copy=True).contiguous()
            overflow = ""
            if dtype is not None and bool(torch.isfinite(src).all()):
                overflow = f" after casting to {dtype} (too large for it; save in bf16 or fp32)"
            _require_finite(name, label, out, overflow)
            tensors[name + suffix] = out
        alpha = parts["alpha"].detach().to(device="cpu", dtype=torch.float32, copy=True).reshape(())
        _require_finite(name, "alpha", alpha)
        tensors[name + ALPHA] = alpha

    header = dict(metadata)
    header["sshs_model_hash"] = weights_hash(tensors)
    atomic_write(target, _safetensors_bytes(tensors, header))


def _write_all(fileobj, data: bytes) -> None:
    """Write `data` in chunks (kept separate so a failure midway can be simulated in tests)."""
    view = memoryview(data)
    for start in range(0, len(view), _WRITE_CHUNK):
        fileobj.write(view[start : start + _WRITE_CHUNK])


def _temp_prefix(target: Path) -> str:
    return temp_name(target.name)


def _remove_stale_temps(target: Path) -> None:
    """Deletes the temp files of earlier saves to `target` whose process is gone (killed mid-write).

    Loaders never see them (hidden, and not named .safetensors); this only gives the disk space
    back. A temp file of a process that is still running is left alone. POSIX only: Windows has
    no harmless way to ask whether a process id is alive.
    """
    if os.name != "posix":
        return
    prefix = _temp_prefix(target)
    try:
        names = [n for n in os.listdir(target.parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        try:
            os.unlink(target.parent / name)
        except OSError:
            pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def atomic_write(target: Path, data: bytes) -> None:
    folder = target.parent
    tmp = folder / temp_name(target.name, os.getpid())
    _remove_stale_temps(target)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        # os.replace is atomic on POSIX and Windows: readers see the old file or the new one.
        os.replace(tmp, target)
    except BaseException as exc:
        # BaseException too: a cancel (KeyboardInterrupt, ComfyUI's interrupt) must not leave debris.
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise LoRALabError(
                f"Could not write the LoRA to '{target}': {exc}. Check that the folder is writable "
                "and the disk has free space; any previous file there is unchanged."
            ) from exc
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; Windows cannot open folders, and the file is
    # already complete either way, so this is best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# loading and inspecting


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a kohya-format LoRA from a .safetensors file; return (weights, metadata).

    Only .safetensors is accepted. Modules are validated (both halves present, ranks match, finite
    values) and a `LoRALabError` names the first bad one. A module without alpha is loaded with
    alpha = rank, i.e. scale 1.0 — what ComfyUI, A1111 and diffusers do with such files — so the
    LoRA keeps the strength it had. Tensors come back on the CPU in their stored dtype (alpha as
    a 0-dim float32). Missing metadata gives an empty dict.
    """
    source = _safetensors_path(path, "load")
    if not source.is_file():
        raise LoRALabError(f"LoRA file '{source}' does not exist; check the name and folder.")
    try:
        with safe_open(str(source), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise LoRALabError(
            f"'{source.name}' is not a readable safetensors file ({exc}); it may be damaged or an "
            "incomplete download."
        ) from exc

    for name, parts in _split_modules(weights).items():
        rank = _module_rank(name, parts)
        for suffix, part in _PARTS:
            if part in parts:
                _require_finite(name, suffix.lstrip("."), parts[part])
        if "alpha" in parts:
            weights[name + ALPHA] = parts["alpha"].to(torch.float32).reshape(())
        else:
            weights[name + ALPHA] = torch.tensor(float(rank), dtype=torch.float32)
    return weights, metadata


def lora_modules(weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """Module name -> (rank, alpha); a module without alpha reports alpha = rank (scale 1.0)."""
    result = {}
    for name, parts in sorted(_split_modules(weights).items()):
        rank = _module_rank(name, parts)
        alpha = float(parts["alpha"].reshape(()).item()) if "alpha" in parts else float(rank)
        result[name] = (rank, alpha)
    return result


# Name beginnings that give a LoRA's family away (for messages only), in the user's words.
_FAMILY_HINTS = (
    (("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te3_"), "Flux or Chroma"),
    (("lora_unet_joint_blocks_",), "SD3.5"),
    (("lora_unet_transformer_blocks_",), "Qwen-Image"),
    (("lora_te2_",), "SDXL"),
    (("lora_te_", "lora_unet_down_blocks_", "lora_unet_up_blocks_"), "SD1.5 or SD2.x"),
)


def _guess_family(names: set[str]) -> str | None:
    """Best guess of the family a set of kohya module names was trained on (for messages only)."""
    for starts, label in _FAMILY_HINTS:
        if any(n.startswith(starts) for n in names):
            return label
    return None


def check_compatible(weights: Mapping[str, torch.Tensor], expected_names: set[str], label: str) -> None:
    """Raise a `LoRALabError` unless every module in `weights` is one of `expected_names`.

    `expected_names` are the kohya module names the current model and targets produce; `label`
    is the model's family in the user's words ("SD1.5", "Qwen-Image"). A file covering only part of the
    expected modules is fine (e.g. trained without the text encoder); a module the model lacks
    would be silently dropped, so it is refused. The message says how many modules matched and
    shows a few names from each side.
    """
    names = set(lora_modules(weights))
    unknown = sorted(names - set(expected_names))
    if not unknown:
        return
    matched = len(names) - len(unknown)
    file_examples = ", ".join(unknown[:3])
    model_examples = ", ".join(sorted(set(expected_names) - names)[:3] or sorted(expected_names)[:3])
    head = (
        f"This LoRA does not fit the {label} model: {matched} of its {len(names)} modules match "
        f"(in the file, not in the model: {file_examples}; the model has e.g.: {model_examples or 'nothing'})."
    )
    if matched == 0:
        guess = _guess_family(names)
        hint = f" It looks like a {guess} LoRA." if guess and label not in guess.split(" or ") else ""
        raise LoRALabError(f"{head}{hint} Pick a LoRA trained for {label}, or start a new one.")
    raise LoRALabError(
        f"{head} Pick a LoRA trained for {label}; if it is one, it adapts layers this training does "
        "not target (e.g. the text encoder or conv layers), so enable the same targets as when it was trained."
    )


# --------------------------------------------------------------------------------------------
# metadata


def weights_hash(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over the tensors in sorted key order: name, dtype, shape and raw bytes.

    Same tensors -> same hash on any machine; changing any value, dtype or shape changes it.
    (sd-scripts hashes the file's data section instead; tools only display this value.)
    """
    digest = hashlib.sha256()
    for key in sorted(weights):
        t = weights[key].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        # Length-prefixed fields so that no two different inputs produce the same byte stream.
        for field in (key.encode(), str(t.dtype).encode(), json.dumps(list(t.shape)).encode(), raw):
            digest.update(len(field).to_bytes(8, "little"))
            digest.update(field)
    return digest.hexdigest()


def _metadata_str(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def build_metadata(
    *,
    base_model: "str | Profile",
    output_name: str,
    network: "NetworkConfig",
    learning_rate: float,
    text_encoder_lr: float | None,
    steps: int,
    epochs: int | None,
    started_at: float,
    optimizer: str,
    scheduler: str,
    extra: Mapping | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, str]:
    """Header metadata as sd-scripts writes it, all values strings.

    `base_model` is a family's profile (`trainer.profiles`) or its key ("sd15", "sdxl", "flux", ...);
    its metadata is what that family's reference trainer writes.

    Written: ss_base_model_version ("sd_v1", "sdxl_base_v1-0", "flux1", ...), ss_output_name,
    ss_network_module ("networks.lora"), ss_network_dim, ss_network_alpha, ss_network_args (JSON;
    conv_dim/conv_alpha when conv_rank > 0, else "{}"), ss_learning_rate, ss_unet_lr,
    ss_text_encoder_lr ("None" when the text encoder is not trained, as sd-scripts writes it),
    ss_steps, ss_epoch ("0" when the run was counted in steps only), ss_training_started_at (unix
    time), ss_optimizer, ss_lr_scheduler, ss_v2, and modelspec.sai_model_spec / architecture /
    implementation / title / date (UTC ISO 8601 of `started_at`).

    `network.network_args()` names a LyCORIS algorithm ({"algo": "lokr", "factor": "-1", ...});
    with it ss_network_module is "lycoris.kohya", as LyCORIS writes, so other tools recognise
    LoKr / LoHa / DoRA files, and the args join ss_network_args.

    `extra` adds keys after these (and may override them): keys starting with "ss_",
    "modelspec." or "lora_lab_" are kept, any other key gets a "lora_lab_" prefix (so
    {"version": "0.1.0"} becomes lora_lab_version); non-string values are str()/JSON-encoded.
    With `weights`, sshs_model_hash = weights_hash(weights); `save_lora` recomputes it from the
    tensors as saved anyway.
    """
    try:
        profile = profile_for(base_model) if isinstance(base_model, str) else base_model
    except ConfigError as e:
        raise ConfigError("base_model", e.message) from None
    if not isinstance(output_name, str) or not output_name.strip():
        raise ConfigError("output_name", "must not be empty; give the LoRA a file name.")

    version, architecture, implementation = profile.metadata
    args = network.network_args()
    if network.conv_rank > 0:
        # sd-scripts records network args as the strings given on its command line.
        args.update(conv_dim=str(network.conv_rank), conv_alpha=str(float(network.conv_alpha)))

    metadata = {
        "ss_base_model_version": version,
        "ss_output_name": output_name,
        "ss_network_module": "lycoris.kohya" if "algo" in args else "networks.lora",
        "ss_network_dim": str(network.rank),
        "ss_network_alpha": str(float(network.alpha)),
        "ss_network_args": json.dumps(args),
        "ss_learning_rate": str(float(learning_rate)),
        "ss_unet_lr": str(float(learning_rate)),
        "ss_text_encoder_lr": "None" if text_encoder_lr is None else str(float(text_encoder_lr)),
        "ss_steps": str(int(steps)),
        "ss_epoch": str(int(epochs)) if epochs is not None else "0",
        "ss_training_started_at": str(float(started_at)),
        "ss_optimizer": str(optimizer),
        "ss_lr_scheduler": str(scheduler),
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": output_name,
        "modelspec.date": datetime.datetime.fromtimestamp(
            float(started_at), tz=datetime.timezone.utc
        ).isoformat(timespec="seconds"),
        **profile.metadata_extra,
    }
    for key, value in (extra or {}).items():
        key = str(key)
        if not key.startswith(("ss_", "modelspec.", "lora_lab_")):
            key = "lora_lab_" + key
        metadata[key] = _metadata_str(value)
    if weights is not None:
        metadata["sshs_model_hash"] = weights_hash(weights)
    return metadata
