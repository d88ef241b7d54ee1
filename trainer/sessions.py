"""The one session store: training sessions that outlive a single queue run.

A ComfyUI user queues the same workflow again to continue training, presses Cancel and queues to
resume, or chains two Train nodes. The session (weights, optimizer state, step, history) must
survive between those executions, keyed by the Train node that owns it. This module is its only
owner; nothing else keeps sessions.

A session is reused only while its fingerprint (model, dataset, settings) is unchanged; anything
else starts a new one, and the caller tells the user why.

Sessions live in memory; restarting ComfyUI loses them, except what `trainer.resume` wrote (a
resumable state next to each `save_every` LoRA). A session is released, and its memory freed, when
its Train node restarts (mode "restart" or changed inputs), or when the node is deleted in the
browser (the frontend calls POST /lora_lab/release).

Public API:
    STORE                        the store: get / put / release / keys / describe / alive
    node_key(node_id) -> str     the key of the session a Train node owns
    next_target(entry, steps)    where a run queued now trains to
"""

from __future__ import annotations

import gc
import threading
import weakref
from dataclasses import dataclass

from .loop import Session


@dataclass
class Entry:
    session: Session
    fingerprint: dict[str, str]  # part name -> hash of what the session was built from
    target_step: int  # where the last run was heading; a Cancel leaves step < target_step


class SessionStore:
    def __init__(self):
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        # Every session ever stored, until it is garbage: tells whether releasing really freed it.
        self._created: weakref.WeakSet[Session] = weakref.WeakSet()

    def get(self, key: str) -> Entry | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, entry: Entry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._created.add(entry.session)

    def release(self, key: str) -> bool:
        """Forget a session (its node was deleted, or the user restarted): frees its memory."""
        with self._lock:
            return self._entries.pop(key, None) is not None

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def describe(self) -> list[dict]:
        """One line per stored session, for GET /lora_lab/sessions."""
        with self._lock:
            items = list(self._entries.items())
        return [{"key": k, "step": e.session.step, "target_step": e.target_step, "started_at": e.session.started_at} for k, e in items]

    def alive(self) -> int:
        """Sessions still in memory, stored or not, after a garbage collection. Equals len(keys())
        unless something outside the store still holds a released session."""
        gc.collect()
        return len(self._created)


STORE = SessionStore()


def node_key(node_id) -> str:
    """The key of the session the Train node `node_id` owns (chained Train nodes share the first's)."""
    return f"train:{node_id}"


def next_target(entry: Entry, steps: int) -> int:
    """An interrupted run is finished first; a finished one is extended by `steps`."""
    if entry.session.step < entry.target_step:
        return entry.target_step
    return entry.session.step + steps
