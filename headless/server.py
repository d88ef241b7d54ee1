"""Start a real ComfyUI server in a throw-away folder and talk to its HTTP API.

Used by the headless command and by the integration tests. Stdlib only (urllib, subprocess):
the calling process never imports ComfyUI.

    with ComfyServer(comfyui_path, base_dir) as srv:
        pid = srv.queue(prompt)              # raises PromptRejected on validation errors
        entry = srv.wait(pid, timeout=60)    # history entry: status / outputs / messages
        entry = srv.run(prompt)              # queue + wait, raises ExecutionFailed unless success

Layout created under ``base_dir`` (passed to ComfyUI as --base-directory, so it
is also where ComfyUI looks for ``custom_nodes/`` and ``models/``)::

    custom_nodes/lora_lab -> <repo root>   (symlink; a copy where links are not possible)
    models/checkpoints/ models/loras/ ...
    input/ output/ user/ temp/
    comfyui.log                            (server stdout + stderr)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # the pack folder
PACK_NAME = "lora_lab"


class ServerError(RuntimeError):
    """The server process died, never came up, or answered an HTTP request unexpectedly."""


class PromptRejected(Exception):
    """POST /prompt refused the prompt (HTTP 400), or dropped some of its nodes (HTTP 200 with
    node_errors): it failed validation. Inspect .error / .node_errors."""

    def __init__(self, status, body):
        self.status = status
        self.body = body if isinstance(body, dict) else {"raw": body}
        self.error = self.body.get("error")
        self.node_errors = self.body.get("node_errors") or {}
        msg = self.error.get("message") if isinstance(self.error, dict) else self.error
        super().__init__(f"prompt rejected (HTTP {status}): {msg}; node_errors={json.dumps(self.node_errors)[:2000]}")


class ExecutionFailed(Exception):
    """A queued prompt finished with status 'error'. .entry is the history entry."""

    def __init__(self, entry, log_tail=""):
        self.entry = entry
        self.error = execution_error(entry)
        detail = ""
        if self.error:
            detail = (f"{self.error.get('node_type')} (node {self.error.get('node_id')}): "
                      f"{self.error.get('exception_type')}: {self.error.get('exception_message')}\n"
                      + "".join(self.error.get("traceback") or []))
        super().__init__(f"prompt failed: {status_str(entry)}\n{detail}\n--- server log tail ---\n{log_tail}")


def status_str(entry):
    return ((entry or {}).get("status") or {}).get("status_str")


def messages(entry):
    """[(event, data), ...] from a history entry ('execution_start', 'execution_cached', ...)."""
    return [tuple(m) for m in ((entry or {}).get("status") or {}).get("messages", [])]


def cached_nodes(entry):
    """Node ids that ComfyUI served from its cache instead of executing."""
    out = []
    for ev, data in messages(entry):
        if ev == "execution_cached":
            out.extend(data.get("nodes", []))
    return out


def execution_error(entry):
    for ev, data in messages(entry):
        if ev in ("execution_error", "execution_interrupted"):
            return dict(data, event=ev)
    return None


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def looks_like_comfyui(path) -> bool:
    if not path:
        return False
    p = Path(path)
    return (p / "main.py").is_file() and (p / "comfy").is_dir()


def install_pack(custom_nodes_dir, pack_root=REPO_ROOT, name=PACK_NAME):
    """Make the pack visible to ComfyUI as custom_nodes/<name> (symlink, or a copy as a fallback)."""
    custom_nodes_dir = Path(custom_nodes_dir)
    custom_nodes_dir.mkdir(parents=True, exist_ok=True)
    dest = custom_nodes_dir / name
    if dest.is_symlink() or dest.exists():
        return dest
    try:
        os.symlink(pack_root, dest, target_is_directory=True)
    except OSError:
        shutil.copytree(pack_root, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".venv-*", "__pycache__", ".pytest_cache", "test-artifacts", "build"))
    return dest


class ComfyServer:
    """A ComfyUI server process running out of ``base_dir``, with this pack installed (CPU by default)."""

    def __init__(self, comfyui_path, base_dir, port=None, extra_args=(), python=None,
                 startup_timeout=120.0, host="127.0.0.1", env=None, install=True, cpu=True):
        self.comfyui_path = Path(comfyui_path).resolve()
        if not looks_like_comfyui(self.comfyui_path):
            raise ServerError(f"{self.comfyui_path} does not look like a ComfyUI checkout (no main.py / comfy/)")
        self.base_dir = Path(base_dir).resolve()
        self.host = host
        self.port = port
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.env = env
        self.install = install
        self.cpu = cpu
        self.client_id = uuid.uuid4().hex
        self.proc = None
        self.log_path = self.base_dir / "comfyui.log"
        self._log_fh = None
        self.models_dir = self.base_dir / "models"
        self.input_dir = self.base_dir / "input"
        self.output_dir = self.base_dir / "output"
        self.user_dir = self.base_dir / "user"
        self.temp_dir = self.base_dir / "temp"  # ComfyUI appends "temp" to --temp-directory
        self.custom_nodes_dir = self.base_dir / "custom_nodes"

    # ------------------------------------------------------------ lifecycle
    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def prepare_dirs(self):
        for d in (self.input_dir, self.output_dir, self.user_dir, self.base_dir / "temp",
                  self.custom_nodes_dir, self.models_dir / "checkpoints", self.models_dir / "loras"):
            d.mkdir(parents=True, exist_ok=True)
        if self.install:
            install_pack(self.custom_nodes_dir)

    def command(self):
        return [
            self.python, "main.py",
            *(["--cpu"] if self.cpu else []),
            "--listen", self.host,
            "--port", str(self.port),
            "--use-pytorch-cross-attention",
            "--disable-auto-launch",
            "--base-directory", str(self.base_dir),
            "--input-directory", str(self.input_dir),
            "--output-directory", str(self.output_dir),
            "--user-directory", str(self.user_dir),
            "--temp-directory", str(self.base_dir),
            # the default database lives inside the ComfyUI checkout: keep it in the temp folder
            # (an in-memory sqlite URL works too but logs cross-thread errors on every prompt)
            "--database-url", "sqlite:///" + (self.user_dir / "comfyui.db").as_posix(),
            *self.extra_args,
        ]

    def start(self):
        if self.proc is not None:
            return self
        self.prepare_dirs()
        if self.port is None:
            self.port = free_port(self.host)
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["COMFYUI_PATH"] = str(self.comfyui_path)
        self._log_fh = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(), cwd=str(self.comfyui_path), env=env,
            stdin=subprocess.DEVNULL, stdout=self._log_fh, stderr=subprocess.STDOUT,
        )
        self.started_at = time.monotonic()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - self.started_at
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + self.startup_timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited during startup (rc={self.proc.returncode})\n"
                                  f"--- server log ---\n{self.log_tail(200)}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                last = e
            time.sleep(0.25)
        raise ServerError(f"ComfyUI did not answer on {self.url} within {self.startup_timeout:.0f}s "
                          f"(last error: {last})\n--- server log ---\n{self.log_tail(200)}")

    def stop(self, timeout=15.0):
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            try:
                p.send_signal(signal.SIGINT if os.name != "nt" else signal.SIGTERM)
                p.wait(timeout=timeout / 2)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=timeout / 2)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------ logs
    def log_text(self):
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=80):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def pack_import_status(self, name=PACK_NAME):
        """'ok', 'failed' or None (not scanned), from ComfyUI's "Import times for custom nodes" log lines."""
        suffix = os.sep + os.path.join("custom_nodes", name)
        for line in self.log_text().splitlines():
            line = line.rstrip()
            if line.endswith(suffix) and "seconds" in line:
                return "failed" if "IMPORT FAILED" in line else "ok"
        return None

    def pack_import_error(self, name=PACK_NAME):
        """The 'Cannot import ...' line (plus the traceback before it) for the pack, or None."""
        lines = self.log_text().splitlines()
        needle = os.path.join("custom_nodes", name) + " module for custom nodes"
        for i, line in enumerate(lines):
            if "Cannot import" in line and needle in line:
                start = i
                for j in range(i, max(-1, i - 80), -1):
                    if lines[j].startswith("Traceback"):
                        start = j
                        break
                return "\n".join(lines[start:i + 1])
        return None

    # ------------------------------------------------------------ HTTP
    def request(self, method, path, body=None, timeout=30.0):
        """-> (status, parsed JSON or raw text). Does not raise on HTTP error statuses."""
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            dead = "" if self.alive() else " (server process is not running)"
            raise ServerError(f"{method} {path} failed: {e}{dead}\n--- server log tail ---\n{self.log_tail()}") from e
        text = raw.decode("utf-8", errors="replace")
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def get_json(self, path, timeout=30.0):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path} -> HTTP {status}: {str(body)[:1000]}")
        return body

    def post_json(self, path, body, timeout=30.0):
        status, resp = self.request("POST", path, body, timeout=timeout)
        if status != 200:
            raise ServerError(f"POST {path} -> HTTP {status}: {str(resp)[:1000]}")
        return resp

    # ------------------------------------------------------------ API
    def queue(self, prompt, extra_data=None, prompt_id=None):
        """POST /prompt (API-format dict). Returns the prompt id; raises PromptRejected on HTTP 400."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        if prompt_id:
            body["prompt_id"] = prompt_id
        status, resp = self.request("POST", "/prompt", body)
        if status == 400:
            raise PromptRejected(status, resp)
        if status != 200 or not isinstance(resp, dict) or "prompt_id" not in resp:
            raise ServerError(f"POST /prompt -> HTTP {status}: {str(resp)[:2000]}")
        if resp.get("node_errors"):
            # ComfyUI queues the outputs that passed validation and drops the others (HTTP 200):
            # a graph whose Train node was dropped must not look like a successful run.
            self.post_json("/queue", {"delete": [resp["prompt_id"]]})  # still pending: never runs
            self.interrupt(resp["prompt_id"])  # already running: stopped
            raise PromptRejected(status, resp)
        return resp["prompt_id"]

    def history(self, prompt_id=None):
        return self.get_json("/history" if prompt_id is None else f"/history/{urllib.parse.quote(prompt_id)}")

    def wait(self, prompt_id, timeout=120.0, poll=0.2):
        """Poll /history/<id> until the prompt has finished. Returns the history entry:
        {"prompt": ..., "outputs": {node_id: {...}}, "status": {"status_str", "completed", "messages"}, "meta": ...}."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.history(prompt_id)
            entry = (h or {}).get(prompt_id)
            if entry and entry.get("status") is not None:
                return entry
            if not self.alive():
                raise ServerError(f"server died while running {prompt_id}\n--- server log tail ---\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f}s; "
                                   f"queue={self.queue_state()}\n--- server log tail ---\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, prompt, timeout=120.0, check=True, extra_data=None):
        """queue + wait. With check=True raises ExecutionFailed unless the status is 'success'."""
        entry = self.wait(self.queue(prompt, extra_data=extra_data), timeout=timeout)
        if check and status_str(entry) != "success":
            raise ExecutionFailed(entry, self.log_tail())
        return entry

    def queue_state(self):
        return self.get_json("/queue")

    def object_info(self, node_class=None):
        if node_class:
            return self.get_json(f"/object_info/{urllib.parse.quote(node_class)}")[node_class]
        return self.get_json("/object_info", timeout=120.0)

    def interrupt(self, prompt_id=None):
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models=True, free_memory=True, settle=0.5):
        """POST /free. free_memory also drops ComfyUI's node output cache (so an identical prompt re-executes).
        The worker applies it when idle or after the running prompt; ``settle`` gives an idle worker time to do so."""
        self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})
        if settle:
            time.sleep(settle)

    def clear_history(self):
        self.post_json("/history", {"clear": True})

    def output_file(self, image_info):
        """Path of a file listed in a node's UI output ({'filename', 'subfolder', 'type'})."""
        base = {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}[image_info.get("type", "output")]
        return base / image_info.get("subfolder", "") / image_info["filename"]
