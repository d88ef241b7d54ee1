"""HTTP routes the browser extension (web/lora_lab.js) calls.

POST /lora_lab/schedule_preview   (also reachable as /api/lora_lab/schedule_preview)
    JSON body, every field optional (missing ones take the Optimizer node's defaults):
        {"scheduler": "cosine", "warmup_ratio": 0.05, "warmup_steps": 0, "min_lr_ratio": 0.0,
         "cycles": 1, "power": 1.0, "unet_lr": 1e-4, "steps": 1000, "points": 200}
        "train_node": "6"   (optional) the Train node the Optimizer is connected to
    200 -> {"points": [[step, lr], ...], "steps": T, "warmup_steps": W, "base_lr": unet_lr, "continues_from": S}
           The curve is trainer.schedule.preview on the config the Optimizer node builds
           (LoRALabOptimizer._configs), so the chart is exactly what trains. When `train_node` has
           a session with these settings, queueing continues it: the curve is the session's own
           (`Session.lr_plan`: the cycles it trained, then the new cycle of `steps`) and
           "continues_from" is the step it will continue from (absent for a new run).
    200 -> {"error": "field: message", "field": "field"} when the settings are invalid (a 200, so
           a half-edited widget does not log a failed request in the browser console).
    400 -> {"error": ...} when the body is not a JSON object.

POST /lora_lab/release   {"node_id": "6"}
    The browser deleted Train node 6: forget its training session and free its memory.
    200 -> {"released": true|false, "key": "train:6"}   (false: it had none, e.g. never queued)
    400 -> {"error": ...} when node_id is missing.

GET /lora_lab/sessions[?alive=1]
    200 -> {"sessions": [{"key", "step", "target_step", "started_at"}, ...]}   (step is live)
    With alive=1 also "alive": sessions still in memory after a full garbage collection (slow:
    for tests and diagnosis); more than the listed ones means a released session is still held.
"""

from __future__ import annotations

import json
import math

from ..trainer.errors import ConfigError
from ..trainer.schedule import preview, warmup_steps_for
from ..trainer.sessions import STORE, next_target, node_key
from .config import LoRALabOptimizer

SCHEDULE_PREVIEW_PATH = "/lora_lab/schedule_preview"
RELEASE_PATH = "/lora_lab/release"
SESSIONS_PATH = "/lora_lab/sessions"
DEFAULT_PREVIEW_STEPS = 1000
MAX_PREVIEW_POINTS = 1000

_INT_FIELDS = ("warmup_steps", "cycles", "steps", "points")
_SCHEDULE_FIELDS = ("scheduler", "warmup_ratio", "warmup_steps", "min_lr_ratio", "cycles", "power")


def _optimizer_defaults() -> dict:
    required = LoRALabOptimizer.INPUT_TYPES()["required"]
    return {name: spec[1]["default"] for name, spec in required.items()}


def _whole(value):
    """JSON has one number type: 1000.0 from a browser is the whole number 1000."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def schedule_preview(body: dict) -> dict:
    """The route's answer for a parsed body (see the module docstring). Never raises ConfigError."""
    values = _optimizer_defaults()
    values.update({k: body[k] for k in ("unet_lr", *_SCHEDULE_FIELDS) if k in body and body[k] is not None})
    steps = _whole(body.get("steps", DEFAULT_PREVIEW_STEPS))
    points = _whole(body.get("points", 200))
    for name in _INT_FIELDS:
        if name in values:
            values[name] = _whole(values[name])
    try:
        if isinstance(points, bool) or not isinstance(points, int) or not 2 <= points <= MAX_PREVIEW_POINTS:
            raise ConfigError("points", f"expected a whole number between 2 and {MAX_PREVIEW_POINTS}, got {points!r}.")
        opt, sched = LoRALabOptimizer._configs(**values)
        lr = values["unet_lr"]
        curve = preview(sched, lr, steps, points)
        warmup = warmup_steps_for(sched, steps)
        entry = STORE.get(node_key(body["train_node"])) if body.get("train_node") not in (None, "") else None
        spec = entry.session.spec if entry is not None else None
        if spec is not None and spec.schedule == sched and spec.optimizer.unet_lr == opt.unet_lr:
            until = next_target(entry, steps)
            curve = entry.session.lr_plan(until, points)
            return {"points": [[int(s), float(v)] for s, v in curve], "steps": until, "warmup_steps": int(warmup), "base_lr": float(lr), "continues_from": entry.session.step}
    except ConfigError as e:
        return {"error": str(e), "field": e.field}
    except (TypeError, ValueError) as e:  # a value of the wrong type that no check names
        return {"error": f"schedule: {e}", "field": "schedule"}
    return {"points": [[int(s), float(v)] for s, v in curve], "steps": steps, "warmup_steps": int(warmup), "base_lr": float(lr)}


def release(body) -> tuple[int, dict]:
    """(HTTP status, answer) for POST /lora_lab/release."""
    node_id = body.get("node_id") if isinstance(body, dict) else None
    if isinstance(node_id, bool) or not isinstance(node_id, (str, int)) or str(node_id) == "":
        return 400, {"error": 'node_id: expected the Train node\'s id, e.g. {"node_id": "6"}'}
    key = node_key(node_id)
    return 200, {"released": STORE.release(key), "key": key}


def sessions(alive: bool = False) -> dict:
    """The answer for GET /lora_lab/sessions."""
    answer = {"sessions": STORE.describe()}
    if alive:
        answer["alive"] = STORE.alive()
    return answer


async def _json_body(request):
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return None


def _register() -> None:
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:  # not inside a ComfyUI server process
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return

    @instance.routes.post(SCHEDULE_PREVIEW_PATH)
    async def _schedule_preview(request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            return web.json_response({"error": "body: expected a JSON object"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "body: expected a JSON object"}, status=400)
        return web.json_response(schedule_preview(body))

    @instance.routes.post(RELEASE_PATH)
    async def _release(request):
        status, answer = release(await _json_body(request))
        return web.json_response(answer, status=status)

    @instance.routes.get(SESSIONS_PATH)
    async def _sessions(request):
        return web.json_response(sessions(alive=request.query.get("alive") == "1"))


_register()
